// conv1x1.cu: 1x1 convolution (the output layer: per pixel, a matrix-vector product over channels).
//
// Layout (strides in elements, all buffers C-contiguous float32; HW = H*W pixels of a plane):
//   x   [N, C, H, W]   input             strides (C*HW, HW, W, 1)
//   w   [O, C, 1, 1]   weights (OIHW)    element w[o, c] at o*C + c
//   b   [O]            bias
//   y   [N, O, H, W]   output            strides (O*HW, HW, W, 1)
//   dy  [N, O, H, W]   gradient of the output;  dx [N, C, H, W] gradient of the input
//   dw  [O, C, 1, 1], db [O]   gradients of the weights and the bias
//
// Kernels:
//   conv1x1_forward_v1_direct: one thread per output element y[n,o,p]; sums x[n,c,p] w[o,c] over c.
//   conv1x1_backward_data_v1_direct: one thread per input element dx[n,c,p]; sums
//     dy[n,o,p] w[o,c] over o.
//   conv1x1_backward_weight_v1_block_per_oc: one block per (o, c); each thread sums a fixed
//     strided share of the N*HW products dy[n,o,p] x[n,c,p], then one fixed-order block sum.
//     db comes from launch_bias_backward.
#include "common.cuh"
#include "launchers.h"
#include "reduce.cuh"

namespace unet {

__global__ void conv1x1_forward_v1_direct(const float* __restrict__ x, const float* __restrict__ w,
                                          const float* __restrict__ b, float* __restrict__ y,
                                          int N, int C, int64_t HW, int O) {
  const int64_t total = static_cast<int64_t>(N) * O * HW;
  for (int64_t e = global_thread(); e < total; e += grid_stride()) {
    const int64_t p = e % HW;
    const int o = static_cast<int>((e / HW) % O);
    const int64_t n = e / (HW * O);
    const float* xp = x + n * C * HW + p;            // x[n, 0, p]
    const float* wp = w + static_cast<int64_t>(o) * C;  // w[o, 0]
    float acc = b[o];
    for (int c = 0; c < C; ++c) acc += xp[c * HW] * wp[c];
    y[e] = acc;
  }
}

__global__ void conv1x1_backward_data_v1_direct(const float* __restrict__ dy,
                                                const float* __restrict__ w,
                                                float* __restrict__ dx, int N, int C, int64_t HW,
                                                int O) {
  const int64_t total = static_cast<int64_t>(N) * C * HW;
  for (int64_t e = global_thread(); e < total; e += grid_stride()) {
    const int64_t p = e % HW;
    const int c = static_cast<int>((e / HW) % C);
    const int64_t n = e / (HW * C);
    const float* dyp = dy + n * O * HW + p;  // dy[n, 0, p]
    float acc = 0.0f;
    for (int o = 0; o < O; ++o) acc += dyp[o * HW] * w[static_cast<int64_t>(o) * C + c];
    dx[e] = acc;
  }
}

__global__ void conv1x1_backward_weight_v1_block_per_oc(const float* __restrict__ x,
                                                        const float* __restrict__ dy,
                                                        float* __restrict__ dw, int N, int C,
                                                        int64_t HW, int O) {
  __shared__ float scratch[kWarp];
  const int o = static_cast<int>(blockIdx.x / C);
  const int c = static_cast<int>(blockIdx.x % C);
  float acc = 0.0f;
  for (int n = 0; n < N; ++n) {
    const float* dyp = dy + (static_cast<int64_t>(n) * O + o) * HW;  // dy[n, o, 0]
    const float* xp = x + (static_cast<int64_t>(n) * C + c) * HW;    // x[n, c, 0]
    acc += strided_sum<kReduceIlp>(threadIdx.x, HW, blockDim.x,
                                   [&](int64_t p) { return dyp[p] * xp[p]; });
  }
  const float sum = block_sum(acc, scratch);
  if (threadIdx.x == 0) dw[blockIdx.x] = sum;
}

void launch_conv1x1_forward(const float* x, const float* w, const float* b, float* y, int N, int C,
                            int H, int W, int O, cudaStream_t stream) {
  const int64_t HW = static_cast<int64_t>(H) * W;
  const int64_t total = static_cast<int64_t>(N) * O * HW;
  if (total == 0) return;
  conv1x1_forward_v1_direct<<<grid_1d(total), kBlock1d, 0, stream>>>(x, w, b, y, N, C, HW, O);
  CHECK_LAUNCH("conv1x1_forward_v1_direct");
}

void launch_conv1x1_backward_data(const float* dy, const float* w, float* dx, int N, int C, int H,
                                  int W, int O, cudaStream_t stream) {
  const int64_t HW = static_cast<int64_t>(H) * W;
  const int64_t total = static_cast<int64_t>(N) * C * HW;
  if (total == 0) return;
  conv1x1_backward_data_v1_direct<<<grid_1d(total), kBlock1d, 0, stream>>>(dy, w, dx, N, C, HW,
                                                                            O);
  CHECK_LAUNCH("conv1x1_backward_data_v1_direct");
}

void launch_conv1x1_backward_weight(const float* x, const float* dy, float* dw, float* db, int N,
                                    int C, int H, int W, int O, cudaStream_t stream) {
  const int64_t HW = static_cast<int64_t>(H) * W;
  const int64_t blocks = static_cast<int64_t>(O) * C;
  if (blocks > 0) {
    if (blocks > INT32_MAX)
      throw std::runtime_error("conv1x1_backward_weight: O*C = " + std::to_string(blocks) +
                               " exceeds the grid limit");
    conv1x1_backward_weight_v1_block_per_oc<<<static_cast<unsigned int>(blocks), kReduceBlock, 0,
                                              stream>>>(x, dy, dw, N, C, HW, O);
    CHECK_LAUNCH("conv1x1_backward_weight_v1_block_per_oc");
  }
  launch_bias_backward(dy, db, N, O, HW, stream);
}

}  // namespace unet
