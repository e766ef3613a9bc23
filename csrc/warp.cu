// warp.cu: the augmentation warp (docs/OPS.md, "The augmentation warp"): one draw of the training
// augmentation -- elastic deformation, flips, quarter turns, gray values -- applied jointly to a
// window of image, labels and weights, as a single gather.
//
// Layout: C-contiguous, row-major; element (y, x) of an [H, W] array at y * W + x.
//   image, weights      float32 [H, W]      the source window
//   labels              int32   [H, W]
//   coarse              float32 [2, gy, gx] node displacements in px: [0] rows (dy), [1] columns (dx)
//   image_out, weights_out float32 [H, W], labels_out int32 [H, W]: the augmented window, the
//                       source's shape (H == W when quarter_turns is odd; bindings.cpp checks)
//
// Per output pixel (i, j), in float32:
//   1. undo the quarter turns, then the flips: (y, x) in the warped window;
//   2. displacement d = Keys cubic convolution (a = -0.5) of the node grid at (y, x), node indices
//      clamped; the node coordinate's integer part and fraction come from exact integer arithmetic;
//   3. per axis tap base = y + floor(d) and fraction t = d - floor(d) (exact in float32); the four
//      taps base-1 .. base+2 are mirrored ('reflect', no repeated edge) once and shared by all three
//      outputs (bilinear uses base, base+1; nearest picks base + 1 when t >= 1/2, else base);
//   4. image: 4x4 Keys taps, clip to [0, 1], v^gamma (skipped for gamma 1), then
//      clip(contrast v + offset) with offset = 0.5 - 0.5 contrast + brightness (from the launcher);
//      labels: nearest; weights: bilinear.
// A shift of any size is folded modulo the mirror period before it meets an integer, so no input
// (not even a NaN or infinite node value, for which the result is unspecified) reads out of bounds.
// The per-pixel work is a __host__ __device__ function: tests/test_warp_emulated.py builds it for
// the CPU (tests/warp_host_entry.cu) and checks it against the reference without a GPU.
//
// Kernels:
//   augment_warp_v1: 32x8 threads per block, one output pixel per thread (grid-stride over rows
//     past 65535 row blocks); consecutive threads write consecutive pixels, and a smooth field keeps
//     a warp's 4x4 taps within a few cache lines. 404k pixels for the 636x636 training window.
#include "common.cuh"
#include "launchers.h"

namespace unet {

// Everything one call needs; passed by value to the kernel.
struct AugmentWarpArgs {
  const float* image;
  const int32_t* labels;
  const float* weights;
  const float* coarse;
  float* image_out;
  int32_t* labels_out;
  float* weights_out;
  int H, W;                 // window size
  int grid_y, grid_x;       // node counts
  int quarter_turns;        // 0..3, counter-clockwise (np.rot90)
  bool flip_rows, flip_columns;
  float gamma, contrast, offset;  // offset = 0.5 - 0.5 * contrast + brightness
};

// Keys' weights (a = -0.5) of the taps at offsets -1, 0, 1, 2 for the fraction t in [0, 1); exactly
// (0, 1, 0, 0) at t = 0. The same polynomials, in the same form, as the reference.
__host__ __device__ inline void keys_weights(float t, float w[4]) {
  w[0] = t * (t * (-0.5f * t + 1.0f) - 0.5f);
  w[1] = t * t * (1.5f * t - 2.5f) + 1.0f;
  w[2] = t * (t * (-1.5f * t + 2.0f) + 0.5f);
  w[3] = t * t * (0.5f * t - 0.5f);
}

// The node taps of pixel `pos` on an axis of n pixels and g nodes (node a at pixel a (n-1)/(g-1)):
// clamped node indices and their Keys weights.
__host__ __device__ inline void node_taps(int pos, int n, int g, int index[4], float w[4]) {
  int base = 0;
  float t = 0.0f;
  if (g > 1 && n > 1) {
    const int64_t numerator = static_cast<int64_t>(pos) * (g - 1);
    base = static_cast<int>(numerator / (n - 1));
    t = static_cast<float>(numerator % (n - 1)) / static_cast<float>(n - 1);
  }
  keys_weights(t, w);
  for (int m = 0; m < 4; ++m) {
    const int k = base - 1 + m;
    index[m] = k < 0 ? 0 : (k > g - 1 ? g - 1 : k);
  }
}

// Any integer position mirrored into [0, n) without repeating the edge (period 2(n-1); 0 if n == 1).
__host__ __device__ inline int mirror_index(int64_t i, int n) {
  if (i >= 0 && i < n) return static_cast<int>(i);
  if (n == 1) return 0;
  const int64_t period = 2 * static_cast<int64_t>(n - 1);
  int64_t r = i % period;
  if (r < 0) r += period;
  return static_cast<int>(r < n ? r : period - r);
}

// floor(d) as an integer to add to a pixel index. Beyond 1e9 px it is first reduced modulo the
// mirror period (exact in double; the mirror is periodic, so no tap changes). A NaN or infinite d
// gives 0: the outputs are then unspecified but every read stays inside the window.
__host__ __device__ inline int64_t whole_shift(float whole, int n) {
  if (fabsf(whole) < 1.0e9f) return static_cast<int64_t>(whole);
  if (n == 1) return 0;
  const double r = fmod(static_cast<double>(whole), 2.0 * (n - 1));
  return r == r ? static_cast<int64_t>(r) : 0;
}

// clip to [0, 1]; NaN stays NaN, as in numpy.clip.
__host__ __device__ inline float clip_unit(float v) {
  return v < 0.0f ? 0.0f : (v > 1.0f ? 1.0f : v);
}

// All three outputs of output pixel (i, j).
__host__ __device__ inline void augment_warp_pixel(const AugmentWarpArgs& a, int i, int j) {
  const int H = a.H, W = a.W;
  // 1. Undo the quarter turns (np.rot90), then the flips.
  int p, q;
  switch (a.quarter_turns) {
    case 1: p = j; q = W - 1 - i; break;
    case 2: p = H - 1 - i; q = W - 1 - j; break;
    case 3: p = H - 1 - j; q = i; break;
    default: p = i; q = j; break;
  }
  const int y = a.flip_rows ? H - 1 - p : p;
  const int x = a.flip_columns ? W - 1 - q : q;

  // 2. The displacement at (y, x).
  int node_y[4], node_x[4];
  float wy[4], wx[4];
  node_taps(y, H, a.grid_y, node_y, wy);
  node_taps(x, W, a.grid_x, node_x, wx);
  float d[2];
  for (int c = 0; c < 2; ++c) {
    const float* nodes = a.coarse + static_cast<int64_t>(c) * a.grid_y * a.grid_x;
    float sum = 0.0f;
    for (int m = 0; m < 4; ++m) {
      const float* node_row = nodes + static_cast<int64_t>(node_y[m]) * a.grid_x;
      float along = 0.0f;
      for (int l = 0; l < 4; ++l) along += wx[l] * node_row[node_x[l]];
      sum += wy[m] * along;
    }
    d[c] = sum;
  }

  // 3. Source taps, mirrored once for all three outputs.
  const float whole_y = floorf(d[0]), whole_x = floorf(d[1]);
  const float ty = d[0] - whole_y, tx = d[1] - whole_x;
  const int64_t base_y = y + whole_shift(whole_y, H);
  const int64_t base_x = x + whole_shift(whole_x, W);
  int rows[4], cols[4];
  for (int m = 0; m < 4; ++m) {
    rows[m] = mirror_index(base_y - 1 + m, H);
    cols[m] = mirror_index(base_x - 1 + m, W);
  }

  // 4. Image: Keys bicubic, clip, gray values.
  keys_weights(ty, wy);
  keys_weights(tx, wx);
  float v = 0.0f;
  for (int m = 0; m < 4; ++m) {
    const float* row = a.image + static_cast<int64_t>(rows[m]) * W;
    float along = 0.0f;
    for (int l = 0; l < 4; ++l) along += wx[l] * row[cols[l]];
    v += wy[m] * along;
  }
  v = clip_unit(v);
  if (a.gamma != 1.0f) v = powf(v, a.gamma);
  v = clip_unit(fmaf(v, a.contrast, a.offset));

  const int64_t out = static_cast<int64_t>(i) * W + j;
  a.image_out[out] = v;
  // Labels: nearest, floor(s + 1/2) per axis.
  const int label_row = ty >= 0.5f ? rows[2] : rows[1];
  const int label_col = tx >= 0.5f ? cols[2] : cols[1];
  a.labels_out[out] = a.labels[static_cast<int64_t>(label_row) * W + label_col];
  // Weights: bilinear on taps base, base + 1.
  const float* w0 = a.weights + static_cast<int64_t>(rows[1]) * W;
  const float* w1 = a.weights + static_cast<int64_t>(rows[2]) * W;
  const float top = (1.0f - tx) * w0[cols[1]] + tx * w0[cols[2]];
  const float bottom = (1.0f - tx) * w1[cols[1]] + tx * w1[cols[2]];
  a.weights_out[out] = (1.0f - ty) * top + ty * bottom;
}

constexpr int kWarpBlockX = 32;
constexpr int kWarpBlockY = 8;
constexpr int64_t kMaxGridY = 65535;

__global__ void __launch_bounds__(kWarpBlockX * kWarpBlockY)
    augment_warp_v1(const AugmentWarpArgs args) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= args.W) return;
  const int row_stride = static_cast<int>(gridDim.y * blockDim.y);
  for (int i = blockIdx.y * blockDim.y + threadIdx.y; i < args.H; i += row_stride)
    augment_warp_pixel(args, i, j);
}

// The kernel's arguments (also used by the CPU build of augment_warp_pixel in the tests).
inline AugmentWarpArgs augment_warp_args(const float* image, const int32_t* labels,
                                         const float* weights, const float* coarse,
                                         float* image_out, int32_t* labels_out, float* weights_out,
                                         int H, int W, int grid_y, int grid_x, int quarter_turns,
                                         bool flip_rows, bool flip_columns, double gamma,
                                         double contrast, double brightness) {
  AugmentWarpArgs args{};
  args.image = image;
  args.labels = labels;
  args.weights = weights;
  args.coarse = coarse;
  args.image_out = image_out;
  args.labels_out = labels_out;
  args.weights_out = weights_out;
  args.H = H;
  args.W = W;
  args.grid_y = grid_y;
  args.grid_x = grid_x;
  args.quarter_turns = quarter_turns;
  args.flip_rows = flip_rows;
  args.flip_columns = flip_columns;
  args.gamma = static_cast<float>(gamma);
  args.contrast = static_cast<float>(contrast);
  // Contrast 1 and brightness 0 give offset 0 exactly, so identity parameters leave v unchanged.
  args.offset = static_cast<float>(0.5 - 0.5 * contrast + brightness);
  return args;
}

void launch_augment_warp(const float* image, const int32_t* labels, const float* weights,
                         const float* coarse, float* image_out, int32_t* labels_out,
                         float* weights_out, int H, int W, int grid_y, int grid_x,
                         int quarter_turns, bool flip_rows, bool flip_columns, double gamma,
                         double contrast, double brightness, cudaStream_t stream) {
  if (H == 0 || W == 0) return;
  const AugmentWarpArgs args =
      augment_warp_args(image, labels, weights, coarse, image_out, labels_out, weights_out, H, W,
                        grid_y, grid_x, quarter_turns, flip_rows, flip_columns, gamma, contrast,
                        brightness);
  const int64_t row_blocks = ceil_div<int64_t>(H, kWarpBlockY);
  const dim3 block(kWarpBlockX, kWarpBlockY);
  const dim3 grid(static_cast<unsigned int>(ceil_div<int64_t>(W, kWarpBlockX)),
                  static_cast<unsigned int>(row_blocks < kMaxGridY ? row_blocks : kMaxGridY));
  augment_warp_v1<<<grid, block, 0, stream>>>(args);
  CHECK_LAUNCH("augment_warp_v1");
}

}  // namespace unet
