// elementwise.cu: element-by-element ops on flat C-contiguous float32 buffers of n elements
// (any shape; the bindings check that all arguments of a call have the same shape).
//
//   relu_backward: y (the ReLU's output), dy (its gradient) -> dx = dy where y > 0, else 0
//   accumulate:    dst += src, in place (gradient accumulation)
//
// Kernels:
//   relu_backward_v2_vec4 / accumulate_v2_vec4: four elements per thread and grid-stride step
//     (16-byte accesses), where every pointer is 16-byte aligned (CuPy's allocations are); the
//     last n % 4 elements by the first threads.
//   relu_backward_v1 / accumulate_v1: one element per thread per grid-stride step (any alignment).
#include <algorithm>
#include <cstdint>

#include "common.cuh"
#include "launchers.h"

namespace unet {

// Four elements per thread and step (16-byte loads and stores) where every pointer is 16-byte
// aligned; the n % 4 elements past the last whole vector go to the first threads.
__global__ void relu_backward_v2_vec4(const float* __restrict__ y, const float* __restrict__ dy,
                                      float* __restrict__ dx, int64_t n) {
  const int64_t n4 = n / 4;
  const float4* y4 = reinterpret_cast<const float4*>(y);
  const float4* dy4 = reinterpret_cast<const float4*>(dy);
  float4* dx4 = reinterpret_cast<float4*>(dx);
  for (int64_t e = global_thread(); e < n4; e += grid_stride()) {
    const float4 a = y4[e], g = dy4[e];
    dx4[e] = make_float4(a.x > 0.0f ? g.x : 0.0f, a.y > 0.0f ? g.y : 0.0f, a.z > 0.0f ? g.z : 0.0f,
                         a.w > 0.0f ? g.w : 0.0f);
  }
  const int64_t tail = 4 * n4 + global_thread();
  if (tail < n) dx[tail] = y[tail] > 0.0f ? dy[tail] : 0.0f;
}

__global__ void relu_backward_v1(const float* __restrict__ y, const float* __restrict__ dy,
                                 float* __restrict__ dx, int64_t n) {
  for (int64_t e = global_thread(); e < n; e += grid_stride()) dx[e] = y[e] > 0.0f ? dy[e] : 0.0f;
}

__global__ void accumulate_v2_vec4(float* __restrict__ dst, const float* __restrict__ src,
                                   int64_t n) {
  const int64_t n4 = n / 4;
  float4* d4 = reinterpret_cast<float4*>(dst);
  const float4* s4 = reinterpret_cast<const float4*>(src);
  for (int64_t e = global_thread(); e < n4; e += grid_stride()) {
    const float4 a = d4[e], b = s4[e];
    d4[e] = make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w);
  }
  const int64_t tail = 4 * n4 + global_thread();
  if (tail < n) dst[tail] += src[tail];
}

__global__ void accumulate_v1(float* __restrict__ dst, const float* __restrict__ src, int64_t n) {
  for (int64_t e = global_thread(); e < n; e += grid_stride()) dst[e] += src[e];
}

void launch_relu_backward(const float* y, const float* dy, float* dx, int64_t n,
                          cudaStream_t stream) {
  if (n == 0) return;
  if (aligned16(y) && aligned16(dy) && aligned16(dx))
    launch_kernel("relu_backward_v2_vec4", relu_backward_v2_vec4,
                  dim3(grid_1d(std::max<int64_t>(n / 4, 1))), dim3(kBlock1d), stream, y, dy, dx, n);
  else
    launch_kernel("relu_backward_v1", relu_backward_v1, dim3(grid_1d(n)), dim3(kBlock1d), stream, y,
                  dy, dx, n);
}

void launch_accumulate(float* dst, const float* src, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  if (aligned16(dst) && aligned16(src))
    launch_kernel("accumulate_v2_vec4", accumulate_v2_vec4, dim3(grid_1d(std::max<int64_t>(n / 4, 1))),
                  dim3(kBlock1d), stream, dst, src, n);
  else
    launch_kernel("accumulate_v1", accumulate_v1, dim3(grid_1d(n)), dim3(kBlock1d), stream, dst,
                  src, n);
}

}  // namespace unet
