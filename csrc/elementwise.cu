// elementwise.cu: element-by-element ops on flat C-contiguous float32 buffers of n elements
// (any shape; the bindings check that all arguments of a call have the same shape).
//
//   relu_backward: y (the ReLU's output), dy (its gradient) -> dx = dy where y > 0, else 0
//   accumulate:    dst += src, in place (gradient accumulation)
//
// Kernels:
//   relu_backward_v1 / accumulate_v1: one element per thread per grid-stride step.
#include "common.cuh"
#include "launchers.h"

namespace unet {

__global__ void relu_backward_v1(const float* __restrict__ y, const float* __restrict__ dy,
                                 float* __restrict__ dx, int64_t n) {
  for (int64_t e = global_thread(); e < n; e += grid_stride()) dx[e] = y[e] > 0.0f ? dy[e] : 0.0f;
}

__global__ void accumulate_v1(float* __restrict__ dst, const float* __restrict__ src, int64_t n) {
  for (int64_t e = global_thread(); e < n; e += grid_stride()) dst[e] += src[e];
}

void launch_relu_backward(const float* y, const float* dy, float* dx, int64_t n,
                          cudaStream_t stream) {
  if (n == 0) return;
  relu_backward_v1<<<grid_1d(n), kBlock1d, 0, stream>>>(y, dy, dx, n);
  CHECK_LAUNCH("relu_backward_v1");
}

void launch_accumulate(float* dst, const float* src, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  accumulate_v1<<<grid_1d(n), kBlock1d, 0, stream>>>(dst, src, n);
  CHECK_LAUNCH("accumulate_v1");
}

}  // namespace unet
