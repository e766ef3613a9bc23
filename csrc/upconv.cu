// upconv.cu: 2x2 up-convolution (transposed convolution, kernel 2, stride 2): every output pixel
// receives exactly one tap, y[n,o,2i+ky,2j+kx] = b[o] + sum_c x[n,c,i,j] w[o,c,ky,kx].
//
// Layout (strides in elements, all buffers C-contiguous float32):
//   x   [N, C, H, W]       input                  strides (C*H*W, H*W, W, 1)
//   w   [O, C, 2, 2]       weights (OIHW)         strides (C*4, 4, 2, 1)
//   b   [O]                bias
//   y   [N, O, 2H, 2W]     output                 strides (O*4*H*W, 4*H*W, 2*W, 1)
//   dy  [N, O, 2H, 2W]     gradient of the output; dx [N, C, H, W] gradient of the input
//   dw  [O, C, 2, 2], db [O]   gradients of the weights and the bias
//
// Kernels:
//   upconv2x2_forward_v1_direct: one thread per output element y[n,o,Y,X]; the tap is
//     (ky, kx) = (Y%2, X%2) at input pixel (Y/2, X/2); sums over c.
//   upconv2x2_backward_data_v1_direct: one thread per input element dx[n,c,i,j]; sums the four
//     dy[n,o,2i+ky,2j+kx] w[o,c,ky,kx] over o.
//   upconv2x2_backward_weight_v1_block_per_oc: one block per (o, c); each thread keeps four partial
//     sums over a fixed strided share of the N*H*W input pixels, then four fixed-order block sums
//     give dw[o,c,:,:]. db comes from launch_bias_backward over the 4*H*W output pixels.
#include "common.cuh"
#include "launchers.h"
#include "reduce.cuh"

namespace unet {

__global__ void upconv2x2_forward_v1_direct(const float* __restrict__ x,
                                            const float* __restrict__ w,
                                            const float* __restrict__ b, float* __restrict__ y,
                                            int N, int C, int H, int W, int O) {
  const int H2 = 2 * H, W2 = 2 * W;
  const int64_t in_plane = static_cast<int64_t>(H) * W;
  const int64_t total = static_cast<int64_t>(N) * O * H2 * W2;
  for (int64_t e = global_thread(); e < total; e += grid_stride()) {
    const int X = static_cast<int>(e % W2);
    const int Y = static_cast<int>((e / W2) % H2);
    const int o = static_cast<int>((e / (static_cast<int64_t>(H2) * W2)) % O);
    const int64_t n = e / (static_cast<int64_t>(H2) * W2 * O);
    const int tap = (Y % 2) * 2 + (X % 2);
    const float* xp = x + n * C * in_plane + static_cast<int64_t>(Y / 2) * W + X / 2;  // x[n,0,i,j]
    const float* wp = w + static_cast<int64_t>(o) * C * 4 + tap;                     // w[o,0,ky,kx]
    float acc = b[o];
    for (int c = 0; c < C; ++c) acc += xp[c * in_plane] * wp[c * 4];
    y[e] = acc;
  }
}

__global__ void upconv2x2_backward_data_v1_direct(const float* __restrict__ dy,
                                                  const float* __restrict__ w,
                                                  float* __restrict__ dx, int N, int C, int H,
                                                  int W, int O) {
  const int W2 = 2 * W;
  const int64_t out_plane = static_cast<int64_t>(4) * H * W;
  const int64_t total = static_cast<int64_t>(N) * C * H * W;
  for (int64_t e = global_thread(); e < total; e += grid_stride()) {
    const int j = static_cast<int>(e % W);
    const int i = static_cast<int>((e / W) % H);
    const int c = static_cast<int>((e / (static_cast<int64_t>(H) * W)) % C);
    const int64_t n = e / (static_cast<int64_t>(H) * W * C);
    // dy[n, 0, 2i, 2j]
    const float* dyp = dy + n * O * out_plane + static_cast<int64_t>(2 * i) * W2 + 2 * j;
    float acc = 0.0f;
    for (int o = 0; o < O; ++o) {
      const float* d = dyp + o * out_plane;
      const float* wp = w + (static_cast<int64_t>(o) * C + c) * 4;  // w[o, c, 0, 0]
      acc += d[0] * wp[0] + d[1] * wp[1] + d[W2] * wp[2] + d[W2 + 1] * wp[3];
    }
    dx[e] = acc;
  }
}

__global__ void upconv2x2_backward_weight_v1_block_per_oc(const float* __restrict__ x,
                                                          const float* __restrict__ dy,
                                                          float* __restrict__ dw, int N, int C,
                                                          int H, int W, int O) {
  __shared__ float scratch[kWarp];
  const int o = static_cast<int>(blockIdx.x / C);
  const int c = static_cast<int>(blockIdx.x % C);
  const int W2 = 2 * W;
  const int64_t in_plane = static_cast<int64_t>(H) * W;
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int n = 0; n < N; ++n) {
    const float* xp = x + (static_cast<int64_t>(n) * C + c) * in_plane;        // x[n, c, 0, 0]
    const float* dyp = dy + (static_cast<int64_t>(n) * O + o) * 4 * in_plane;  // dy[n, o, 0, 0]
    for (int64_t pix = threadIdx.x; pix < in_plane; pix += blockDim.x) {
      const int i = static_cast<int>(pix / W);
      const int j = static_cast<int>(pix % W);
      const float v = xp[pix];
      const float* d = dyp + static_cast<int64_t>(2 * i) * W2 + 2 * j;  // dy[n, o, 2i, 2j]
      acc[0] += d[0] * v;
      acc[1] += d[1] * v;
      acc[2] += d[W2] * v;
      acc[3] += d[W2 + 1] * v;
    }
  }
  for (int t = 0; t < 4; ++t) {
    const float sum = block_sum(acc[t], scratch);
    if (threadIdx.x == 0) dw[static_cast<int64_t>(blockIdx.x) * 4 + t] = sum;
  }
}

void launch_upconv2x2_forward(const float* x, const float* w, const float* b, float* y, int N,
                              int C, int H, int W, int O, cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(N) * O * 4 * H * W;
  if (total == 0) return;
  upconv2x2_forward_v1_direct<<<grid_1d(total), kBlock1d, 0, stream>>>(x, w, b, y, N, C, H, W, O);
  CHECK_LAUNCH("upconv2x2_forward_v1_direct");
}

void launch_upconv2x2_backward_data(const float* dy, const float* w, float* dx, int N, int C, int H,
                                    int W, int O, cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(N) * C * H * W;
  if (total == 0) return;
  upconv2x2_backward_data_v1_direct<<<grid_1d(total), kBlock1d, 0, stream>>>(dy, w, dx, N, C, H,
                                                                              W, O);
  CHECK_LAUNCH("upconv2x2_backward_data_v1_direct");
}

void launch_upconv2x2_backward_weight(const float* x, const float* dy, float* dw, float* db, int N,
                                      int C, int H, int W, int O, cudaStream_t stream) {
  const int64_t blocks = static_cast<int64_t>(O) * C;
  if (blocks > 0) {
    if (blocks > INT32_MAX)
      throw std::runtime_error("upconv2x2_backward_weight: O*C = " + std::to_string(blocks) +
                               " exceeds the grid limit");
    upconv2x2_backward_weight_v1_block_per_oc<<<static_cast<unsigned int>(blocks), kReduceBlock,
                                                0, stream>>>(x, dy, dw, N, C, H, W, O);
    CHECK_LAUNCH("upconv2x2_backward_weight_v1_block_per_oc");
  }
  launch_bias_backward(dy, db, N, O, static_cast<int64_t>(4) * H * W, stream);
}

}  // namespace unet
