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
// Kernels:
//   maxpool2x2_forward_v1_direct: one thread per output element; reads its 2x2 window, writes the
//     maximum and its position.
//   maxpool2x2_backward_v1_gather: one thread per input element dx[n,c,Y,X]; takes dy of its
//     window if argmax names it, else writes 0 (every element written, no atomics).
#include "common.cuh"
#include "launchers.h"

namespace unet {

__global__ void maxpool2x2_forward_v1_direct(const float* __restrict__ x, float* __restrict__ y,
                                             uint8_t* __restrict__ argmax, int64_t planes, int H,
                                             int W) {
  const int h = H / 2, w = W / 2;
  const int64_t total = planes * h * w;
  for (int64_t e = global_thread(); e < total; e += grid_stride()) {
    const int j = static_cast<int>(e % w);
    const int i = static_cast<int>((e / w) % h);
    const int64_t plane = e / (static_cast<int64_t>(h) * w);
    const float* win = x + plane * H * W + static_cast<int64_t>(2 * i) * W + 2 * j;
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

__global__ void maxpool2x2_backward_v1_gather(const float* __restrict__ dy,
                                              const uint8_t* __restrict__ argmax,
                                              float* __restrict__ dx, int64_t planes, int H,
                                              int W) {
  const int h = H / 2, w = W / 2;
  const int64_t total = planes * H * W;
  for (int64_t e = global_thread(); e < total; e += grid_stride()) {
    const int X = static_cast<int>(e % W);
    const int Y = static_cast<int>((e / W) % H);
    const int64_t plane = e / (static_cast<int64_t>(H) * W);
    const int64_t out = (plane * h + Y / 2) * w + X / 2;
    const int position = (Y % 2) * 2 + (X % 2);
    dx[e] = argmax[out] == position ? dy[out] : 0.0f;
  }
}

void launch_maxpool2x2_forward(const float* x, float* y, uint8_t* argmax, int N, int C, int H,
                               int W, cudaStream_t stream) {
  const int64_t planes = static_cast<int64_t>(N) * C;
  const int64_t total = planes * (H / 2) * (W / 2);
  if (total == 0) return;
  maxpool2x2_forward_v1_direct<<<grid_1d(total), kBlock1d, 0, stream>>>(x, y, argmax, planes, H,
                                                                         W);
  CHECK_LAUNCH("maxpool2x2_forward_v1_direct");
}

void launch_maxpool2x2_backward(const float* dy, const uint8_t* argmax, float* dx, int N, int C,
                                int H, int W, cudaStream_t stream) {
  const int64_t planes = static_cast<int64_t>(N) * C;
  const int64_t total = planes * H * W;
  if (total == 0) return;
  maxpool2x2_backward_v1_gather<<<grid_1d(total), kBlock1d, 0, stream>>>(dy, argmax, dx, planes, H,
                                                                          W);
  CHECK_LAUNCH("maxpool2x2_backward_v1_gather");
}

}  // namespace unet
