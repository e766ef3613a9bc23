// conv3x3.cu: valid 3x3 convolution (cross-correlation), stride 1, no padding.
//
// Layout (strides in elements, all buffers C-contiguous float32):
//   x   [N, C, H, W]      input activations        strides (C*H*W, H*W, W, 1)
//   w   [O, C, 3, 3]      weights (OIHW)           strides (C*9, 9, 3, 1)
//   b   [O]               bias
//   y   [N, O, P, Q]      output, P = H-2, Q = W-2 strides (O*P*Q, P*Q, Q, 1)
//   dy  [N, O, P, Q]      gradient of the output
//   dx  [N, C, H, W]      gradient of the input
//   dw  [O, C, 3, 3], db [O]   gradients of the weights and the bias
//
// Kernels:
//   conv3x3_forward_v1_direct: one thread per output element y[n,o,i,j]; sums c, ky, kx straight
//     from global memory, adds b[o], optionally applies ReLU (NaN passes through, like np.maximum).
//   conv3x3_backward_data_v1_direct: one thread per input element dx[n,c,y,x]; gathers the up to
//     nine dy[n,o,y-ky,x-kx] that the element contributed to, for every o (no atomics).
//   conv3x3_backward_weight_v1_block_per_oc: one block per (o, c); each thread keeps nine partial
//     sums over its share of the N*P*Q output pixels (fixed strided assignment), then nine
//     fixed-order block sums give dw[o,c,:,:]. db comes from launch_bias_backward.
#include "common.cuh"
#include "launchers.h"
#include "reduce.cuh"

namespace unet {

__global__ void conv3x3_forward_v1_direct(const float* __restrict__ x, const float* __restrict__ w,
                                          const float* __restrict__ b, float* __restrict__ y,
                                          int N, int C, int H, int W, int O, bool relu) {
  const int P = H - 2, Q = W - 2;
  const int64_t total = static_cast<int64_t>(N) * O * P * Q;
  const int64_t plane = static_cast<int64_t>(H) * W;
  for (int64_t e = global_thread(); e < total; e += grid_stride()) {
    const int j = static_cast<int>(e % Q);
    const int i = static_cast<int>((e / Q) % P);
    const int o = static_cast<int>((e / (static_cast<int64_t>(P) * Q)) % O);
    const int64_t n = e / (static_cast<int64_t>(P) * Q * O);
    const float* xp = x + n * C * plane + static_cast<int64_t>(i) * W + j;  // x[n, 0, i, j]
    const float* wp = w + static_cast<int64_t>(o) * C * 9;                  // w[o, 0, 0, 0]
    float acc = b[o];
    for (int c = 0; c < C; ++c, xp += plane, wp += 9) {
      for (int ky = 0; ky < 3; ++ky)
        for (int kx = 0; kx < 3; ++kx) acc += xp[ky * W + kx] * wp[ky * 3 + kx];
    }
    y[e] = (relu && acc < 0.0f) ? 0.0f : acc;
  }
}

__global__ void conv3x3_backward_data_v1_direct(const float* __restrict__ dy,
                                                const float* __restrict__ w,
                                                float* __restrict__ dx, int N, int C, int H, int W,
                                                int O) {
  const int P = H - 2, Q = W - 2;
  const int64_t total = static_cast<int64_t>(N) * C * H * W;
  const int64_t out_plane = static_cast<int64_t>(P) * Q;
  for (int64_t e = global_thread(); e < total; e += grid_stride()) {
    const int xx = static_cast<int>(e % W);
    const int yy = static_cast<int>((e / W) % H);
    const int c = static_cast<int>((e / (static_cast<int64_t>(H) * W)) % C);
    const int64_t n = e / (static_cast<int64_t>(H) * W * C);
    float acc = 0.0f;
    for (int o = 0; o < O; ++o) {
      const float* dyp = dy + (n * O + o) * out_plane;     // dy[n, o, 0, 0]
      const float* wp = w + (static_cast<int64_t>(o) * C + c) * 9;  // w[o, c, 0, 0]
      for (int ky = 0; ky < 3; ++ky) {
        const int i = yy - ky;
        if (i < 0 || i >= P) continue;
        for (int kx = 0; kx < 3; ++kx) {
          const int j = xx - kx;
          if (j < 0 || j >= Q) continue;
          acc += dyp[static_cast<int64_t>(i) * Q + j] * wp[ky * 3 + kx];
        }
      }
    }
    dx[e] = acc;
  }
}

__global__ void conv3x3_backward_weight_v1_block_per_oc(const float* __restrict__ x,
                                                        const float* __restrict__ dy,
                                                        float* __restrict__ dw, int N, int C,
                                                        int H, int W, int O) {
  __shared__ float scratch[kWarp];
  const int o = static_cast<int>(blockIdx.x / C);
  const int c = static_cast<int>(blockIdx.x % C);
  const int P = H - 2, Q = W - 2;
  const int64_t out_plane = static_cast<int64_t>(P) * Q;
  const int64_t in_plane = static_cast<int64_t>(H) * W;
  float acc[9] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  for (int n = 0; n < N; ++n) {
    const float* dyp = dy + (static_cast<int64_t>(n) * O + o) * out_plane;  // dy[n, o, 0, 0]
    const float* xp = x + (static_cast<int64_t>(n) * C + c) * in_plane;     // x[n, c, 0, 0]
    for (int64_t pix = threadIdx.x; pix < out_plane; pix += blockDim.x) {
      const int i = static_cast<int>(pix / Q);
      const int j = static_cast<int>(pix % Q);
      const float g = dyp[pix];
      const float* xw = xp + static_cast<int64_t>(i) * W + j;  // x[n, c, i, j]
      for (int ky = 0; ky < 3; ++ky)
        for (int kx = 0; kx < 3; ++kx) acc[ky * 3 + kx] += g * xw[ky * W + kx];
    }
  }
  for (int t = 0; t < 9; ++t) {
    const float sum = block_sum(acc[t], scratch);
    if (threadIdx.x == 0) dw[static_cast<int64_t>(blockIdx.x) * 9 + t] = sum;
  }
}

void launch_conv3x3_forward(const float* x, const float* w, const float* b, float* y, int N, int C,
                            int H, int W, int O, bool relu, cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(N) * O * (H - 2) * (W - 2);
  if (total == 0) return;
  conv3x3_forward_v1_direct<<<grid_1d(total), kBlock1d, 0, stream>>>(x, w, b, y, N, C, H, W, O,
                                                                      relu);
  CHECK_LAUNCH("conv3x3_forward_v1_direct");
}

void launch_conv3x3_backward_data(const float* dy, const float* w, float* dx, int N, int C, int H,
                                  int W, int O, cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(N) * C * H * W;
  if (total == 0) return;
  conv3x3_backward_data_v1_direct<<<grid_1d(total), kBlock1d, 0, stream>>>(dy, w, dx, N, C, H, W,
                                                                            O);
  CHECK_LAUNCH("conv3x3_backward_data_v1_direct");
}

void launch_conv3x3_backward_weight(const float* x, const float* dy, float* dw, float* db, int N,
                                    int C, int H, int W, int O, cudaStream_t stream) {
  const int64_t blocks = static_cast<int64_t>(O) * C;
  if (blocks > 0) {
    if (blocks > INT32_MAX)
      throw std::runtime_error("conv3x3_backward_weight: O*C = " + std::to_string(blocks) +
                               " exceeds the grid limit");
    conv3x3_backward_weight_v1_block_per_oc<<<static_cast<unsigned int>(blocks), kReduceBlock, 0,
                                              stream>>>(x, dy, dw, N, C, H, W, O);
    CHECK_LAUNCH("conv3x3_backward_weight_v1_block_per_oc");
  }
  launch_bias_backward(dy, db, N, O, static_cast<int64_t>(H - 2) * (W - 2), stream);
}

}  // namespace unet
