// maxpool.cu: 2x2 max-pool, stride 2.
//
// Layout (strides in elements, C-contiguous):
//   x       [N, C, H, W]      float32 input, H and W even     strides (C*H*W, H*W, W, 1)
//   y       [N, C, h, w]      float32 output, h = H/2, w = W/2 strides (C*h*w, h*w, w, 1)
//   argmax  [N, C, h, w]      uint8: 2*dy + dx of the window element taken, in 0..3
//   dy      [N, C, h, w]      gradient of the output;  dx [N, C, H, W] gradient of the input
// Tie rule: the first maximum in raster order (0,0), (0,1), (1,0), (1,1) wins; a later element
// must be strictly greater.
//
// Kernels (H and W even: the windows tile the input exactly):
//   maxpool2x2_forward_v2_direct<Index>: one thread per output element; reads its 2x2 window,
//     writes the maximum and its position.
//   maxpool2x2_backward_v2_window<Index>: one thread per window; writes all four elements of dx,
//     dy where argmax names the element and 0 elsewhere (every element written once, no atomics);
//     with a relu_mask (y, where x is a ReLU's output), 0 there too where y <= 0; accumulating,
//     dx += that instead (the skip maps' gradient, which the concatenation's backward began).
//     (v1 took one thread per dx element: four reads of dy and argmax per window, and three 64-bit
//     divisions per element, 0.15 ms for the first pool on an H200.)
// Index is int32_t where the flat indices fit, else int64_t.
#include "common.cuh"
#include "launchers.h"

namespace unet {

// Index: int32_t where every flat index fits (the launcher checks), int64_t otherwise: 64-bit
// division costs tens of instructions, and these kernels divide to find each element's place.
template <typename Index>
__global__ void maxpool2x2_forward_v2_direct(const float* __restrict__ x, float* __restrict__ y,
                                             uint8_t* __restrict__ argmax, Index planes, int H,
                                             int W) {
  const int h = H / 2, w = W / 2;
  const Index total = planes * h * w;
  for (Index e = static_cast<Index>(global_thread()); e < total; e += static_cast<Index>(grid_stride())) {
    const Index row = e / w;  // plane * h + i
    const int j = static_cast<int>(e - row * w);
    const Index plane = row / h;
    const int i = static_cast<int>(row - plane * h);
    const float* win = x + (plane * H + 2 * i) * static_cast<Index>(W) + 2 * j;
    const float candidates[4] = {win[0], win[1], win[W], win[W + 1]};
    float best = candidates[0];
    uint8_t arg = 0;
    for (uint8_t k = 1; k < 4; ++k) {
      if (candidates[k] > best) {
        best = candidates[k];
        arg = k;
      }
    }
    y[e] = best;
    argmax[e] = arg;
  }
}

// One thread per window: reads dy and argmax once and writes all four elements of dx.
// kAccumulate: dx += the gradient (every element read and written: the bits of accumulate_).
template <typename Index, bool kAccumulate>
__global__ void maxpool2x2_backward_v2_window(const float* __restrict__ dy,
                                              const uint8_t* __restrict__ argmax,
                                              const float* __restrict__ relu_mask,
                                              float* __restrict__ dx, Index planes, int H, int W) {
  const int h = H / 2, w = W / 2;
  const Index total = planes * h * w;
  for (Index e = static_cast<Index>(global_thread()); e < total; e += static_cast<Index>(grid_stride())) {
    const Index row = e / w;  // plane * h + i
    const int j = static_cast<int>(e - row * w);
    const Index plane = row / h;
    const int i = static_cast<int>(row - plane * h);
    float* win = dx + (plane * H + 2 * i) * static_cast<Index>(W) + 2 * j;
    const float g = relu_masked(dy[e], relu_mask, e);  // relu_mask: y, the element taken
    const int a = argmax[e];
    const float v[4] = {a == 0 ? g : 0.0f, a == 1 ? g : 0.0f, a == 2 ? g : 0.0f, a == 3 ? g : 0.0f};
    if constexpr (kAccumulate) {
      win[0] += v[0];
      win[1] += v[1];
      win[W] += v[2];
      win[W + 1] += v[3];
    } else {
      win[0] = v[0];
      win[1] = v[1];
      win[W] = v[2];
      win[W + 1] = v[3];
    }
  }
}

// Calls f(int32_t{}) where every flat index of `count` elements, and the grid-stride step past the
// last one, fits an int32_t; f(int64_t{}) otherwise.
template <class F>
void with_index_type(int64_t count, F f) {
  if (count + int64_t{kMaxGrid1d} * kBlock1d < INT32_MAX) f(int32_t{});
  else f(int64_t{});
}

void launch_maxpool2x2_forward(const float* x, float* y, uint8_t* argmax, int N, int C, int H,
                               int W, cudaStream_t stream) {
  const int64_t planes = static_cast<int64_t>(N) * C;
  const int64_t outputs = planes * (H / 2) * (W / 2);
  if (outputs == 0) return;
  with_index_type(planes * H * W, [&](auto index) {
    using Index = decltype(index);
    launch_kernel("maxpool2x2_forward_v2_direct", maxpool2x2_forward_v2_direct<Index>,
                  dim3(grid_1d(outputs)), dim3(kBlock1d), stream, x, y, argmax,
                  static_cast<Index>(planes), H, W);
  });
}

void launch_maxpool2x2_backward(const float* dy, const uint8_t* argmax, const float* relu_mask,
                                float* dx, bool accumulate, int N, int C, int H, int W,
                                cudaStream_t stream) {
  const int64_t planes = static_cast<int64_t>(N) * C;
  const int64_t outputs = planes * (H / 2) * (W / 2);
  if (outputs == 0) return;
  with_index_type(planes * H * W, [&](auto index) {
    using Index = decltype(index);
    if (accumulate)
      launch_kernel("maxpool2x2_backward_v2_window_accumulate",
                    maxpool2x2_backward_v2_window<Index, true>, dim3(grid_1d(outputs)),
                    dim3(kBlock1d), stream, dy, argmax, relu_mask, dx, static_cast<Index>(planes),
                    H, W);
    else
      launch_kernel("maxpool2x2_backward_v2_window", maxpool2x2_backward_v2_window<Index, false>,
                    dim3(grid_1d(outputs)), dim3(kBlock1d), stream, dy, argmax, relu_mask, dx,
                    static_cast<Index>(planes), H, W);
  });
}

}  // namespace unet
