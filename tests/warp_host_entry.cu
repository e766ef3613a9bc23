// warp_host_entry.cu: the per-pixel function of csrc/warp.cu built as host code (nvcc, no GPU
// needed) and called through ctypes by tests/test_warp_emulated.py, so that the kernel's float32
// arithmetic and index mapping are checked against the NumPy reference on any machine with nvcc.
// The arguments are made by the launcher's own helper; only the launch (one thread per pixel)
// becomes a loop over the pixels.
#include "warp.cu"

extern "C" void augment_warp_host(const float* image, const int32_t* labels, const float* weights,
                                  const float* coarse, float* image_out, int32_t* labels_out,
                                  float* weights_out, int H, int W, int grid_y, int grid_x,
                                  int quarter_turns, int flip_rows, int flip_columns, double gamma,
                                  double contrast, double brightness) {
  const unet::AugmentWarpArgs args = unet::augment_warp_args(
      image, labels, weights, coarse, image_out, labels_out, weights_out, H, W, grid_y, grid_x,
      quarter_turns, flip_rows != 0, flip_columns != 0, gamma, contrast, brightness);
  for (int i = 0; i < H; ++i)
    for (int j = 0; j < W; ++j) unet::augment_warp_pixel(args, i, j);
}
