// crop_concat.cu: the skip connection of the expanding path. The contracting path's map `skip` is
// centre-cropped to the size of the up-convolved map `up`, and the two are stacked along channels.
//
// Layout (strides in elements, C-contiguous float32):
//   up     [N, Cu, H, W]          strides (Cu*H*W, H*W, W, 1)
//   skip   [N, Cs, Hs, Ws]        strides (Cs*Hs*Ws, Hs*Ws, Ws, 1); Hs-H, Ws-W even and >= 0
//   y      [N, Cu+Cs, H, W]       y[:, :Cu] = up, y[:, Cu:] = skip[:, :, oy:oy+H, ox:ox+W]
//                                 with the crop offset (oy, ox) = ((Hs-H)/2, (Ws-W)/2)
//   dy     [N, Cu+Cs, H, W]       gradient of y
//   dup    [N, Cu, H, W]          dy[:, :Cu]
//   dskip  [N, Cs, Hs, Ws]        dy[:, Cu:] inside the crop window, 0 outside (every element
//                                 written)
//
// Kernels:
//   crop_concat_forward_v1_direct: one thread per element of y; copies from up or from skip.
//   crop_concat_backward_v1_direct: one thread per element of dup followed by dskip (one flat index
//     over both outputs); each gathers its value from dy or writes 0.
#include "common.cuh"
#include "launchers.h"

namespace unet {

__global__ void crop_concat_forward_v1_direct(const float* __restrict__ up,
                                              const float* __restrict__ skip,
                                              float* __restrict__ y, int N, int Cu, int H, int W,
                                              int Cs, int Hs, int Ws) {
  const int Cy = Cu + Cs;
  const int oy = (Hs - H) / 2, ox = (Ws - W) / 2;
  const int64_t total = static_cast<int64_t>(N) * Cy * H * W;
  for (int64_t e = global_thread(); e < total; e += grid_stride()) {
    const int j = static_cast<int>(e % W);
    const int i = static_cast<int>((e / W) % H);
    const int ch = static_cast<int>((e / (static_cast<int64_t>(H) * W)) % Cy);
    const int64_t n = e / (static_cast<int64_t>(H) * W * Cy);
    if (ch < Cu) {
      y[e] = up[((n * Cu + ch) * H + i) * W + j];
    } else {
      y[e] = skip[((n * Cs + (ch - Cu)) * Hs + (i + oy)) * Ws + (j + ox)];
    }
  }
}

__global__ void crop_concat_backward_v1_direct(const float* __restrict__ dy,
                                               float* __restrict__ dup, float* __restrict__ dskip,
                                               int N, int Cu, int H, int W, int Cs, int Hs,
                                               int Ws) {
  const int Cy = Cu + Cs;
  const int oy = (Hs - H) / 2, ox = (Ws - W) / 2;
  const int64_t up_total = static_cast<int64_t>(N) * Cu * H * W;
  const int64_t skip_total = static_cast<int64_t>(N) * Cs * Hs * Ws;
  for (int64_t e = global_thread(); e < up_total + skip_total; e += grid_stride()) {
    if (e < up_total) {
      const int64_t pix = e % (static_cast<int64_t>(H) * W);
      const int c = static_cast<int>((e / (static_cast<int64_t>(H) * W)) % Cu);
      const int64_t n = e / (static_cast<int64_t>(H) * W * Cu);
      dup[e] = dy[(n * Cy + c) * H * W + pix];
    } else {
      const int64_t s = e - up_total;
      const int X = static_cast<int>(s % Ws);
      const int Y = static_cast<int>((s / Ws) % Hs);
      const int c = static_cast<int>((s / (static_cast<int64_t>(Hs) * Ws)) % Cs);
      const int64_t n = s / (static_cast<int64_t>(Hs) * Ws * Cs);
      const int i = Y - oy, j = X - ox;
      const bool inside = i >= 0 && i < H && j >= 0 && j < W;
      dskip[s] = inside ? dy[((n * Cy + Cu + c) * H + i) * W + j] : 0.0f;
    }
  }
}

void launch_crop_concat_forward(const float* up, const float* skip, float* y, int N, int Cu, int H,
                                int W, int Cs, int Hs, int Ws, cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(N) * (Cu + Cs) * H * W;
  if (total == 0) return;
  crop_concat_forward_v1_direct<<<grid_1d(total), kBlock1d, 0, stream>>>(up, skip, y, N, Cu, H, W,
                                                                          Cs, Hs, Ws);
  CHECK_LAUNCH("crop_concat_forward_v1_direct");
}

void launch_crop_concat_backward(const float* dy, float* dup, float* dskip, int N, int Cu, int H,
                                 int W, int Cs, int Hs, int Ws, cudaStream_t stream) {
  const int64_t total =
      static_cast<int64_t>(N) * Cu * H * W + static_cast<int64_t>(N) * Cs * Hs * Ws;
  if (total == 0) return;
  crop_concat_backward_v1_direct<<<grid_1d(total), kBlock1d, 0, stream>>>(dy, dup, dskip, N, Cu, H,
                                                                           W, Cs, Hs, Ws);
  CHECK_LAUNCH("crop_concat_backward_v1_direct");
}

}  // namespace unet
