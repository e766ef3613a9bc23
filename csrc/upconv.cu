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
// The three directions as matrix products, with tap t = 2ky + kx:
//   forward          y[m, (o,t)]  = sum_c x[n,c,i,j] w[o,c,t]         M = N*H*W input pixels
//                    m = (n, i, j); column (o, t) = 4o + t is y[n, o, 2i+ky, 2j+kx]; K = C
//   backward data    dx[m, c]     = sum_(o,t) dy[n,o,2i+ky,2j+kx] w[o,c,t]    M = N*H*W, K = 4O
//   backward weight  dw[c, (o,t)] = sum_(n,i,j) x[n,c,i,j] dy[n,o,2i+ky,2j+kx]  M = C, K = N*H*W
// The GEMM versions of the 3x3 convolution (v3-v6, implicit_gemm.cuh) run them through the views
// Upconv2x2*Gemm below, with the version the conv3x3 ops run (the precision mode): the same
// kernels, tiles, split-K and determinism. v1_direct and v2_smem run the direct kernels:
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
#include "implicit_gemm.cuh"
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
                                                  const float* __restrict__ relu_mask,
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
    dx[e] = relu_masked(acc, relu_mask, e);
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

// =================================================================================================
// GEMM views (the interface: implicit_gemm.cuh)
// =================================================================================================

// y[m, (o,t)]: A = x (consecutive m are consecutive pixels of a plane), B[c, (o,t)] = w[o,c,t].
struct Upconv2x2ForwardGemm {
  static constexpr bool kARowsContiguous = true;   // A rows: pixels of x
  static constexpr bool kBRowsContiguous = false;  // B^T rows: w[o, :, t], stride 4 in k
  static constexpr bool kVecA = false, kVecB = false;
  const float* x;
  const float* w;
  const float* b;
  float* y;
  int C, H, W, O;
  int64_t M;  // N*H*W
  int cols;   // 4O
  int K;      // C

  struct KPos {
    int c;
    bool valid;
  };
  struct ARow {
    const float* p;  // &x[n, 0, i, j]
    bool valid;
  };
  struct BRow {
    const float* p;  // &w[o, 0, t]
    bool valid;
  };
  struct CRow {
    float* p;  // &y[n, 0, 2i, 2j]
  };

  __host__ __device__ int64_t k_tiles(int bk) const { return ceil_div(K, bk); }
  __device__ KPos k_pos(int64_t tile, int bk, int kk) const {
    const int c = static_cast<int>(tile) * bk + kk;
    return {c, c < K};
  }
  __device__ ARow a_row(int64_t m) const {
    if (m >= M) return {x, false};
    const PixelIndex p = pixel_index(m, H, W);
    return {x + p.n * C * H * W + p.pix, true};
  }
  __device__ BRow b_row(int col) const {
    return {w + static_cast<int64_t>(col >> 2) * C * 4 + (col & 3), col < cols};
  }
  __device__ const float* a_src(const ARow& r, const KPos& kp) const {
    return r.valid && kp.valid ? r.p + static_cast<int64_t>(kp.c) * H * W : nullptr;
  }
  __device__ const float* b_src(const BRow& r, const KPos& kp) const {
    return r.valid && kp.valid ? r.p + static_cast<int64_t>(kp.c) * 4 : nullptr;
  }
  __device__ CRow c_row(int64_t m) const {
    const PixelIndex p = pixel_index(m, H, W);
    return {y + p.n * O * 4 * H * W + static_cast<int64_t>(2 * p.i) * (2 * W) + 2 * p.j};
  }
  __device__ void store(const CRow& r, int col, float v) const {
    const int o = col >> 2, t = col & 3;
    r.p[static_cast<int64_t>(o) * 4 * H * W + (t >> 1) * (2 * W) + (t & 1)] = v + b[o];
  }
};

// dx[m, c]: A[m, (o,t)] = dy[n, o, 2i+ky, 2j+kx], B[(o,t), c] = w[o, c, t]: for a fixed c, four
// consecutive k (the taps of one o) are contiguous and 16-byte aligned when w is.
struct Upconv2x2BackwardDataGemm {
  static constexpr bool kARowsContiguous = true;   // A rows: pixels of dx (dy read 2 apart)
  static constexpr bool kBRowsContiguous = false;  // B^T rows: w[:, c, :], contiguous in t
  static constexpr bool kVecA = false, kVecB = true;
  const float* dy;
  const float* w;
  float* dx;
  int C, H, W, O;
  int64_t M;  // N*H*W
  int cols;   // C
  int K;      // 4O
  const float* relu_mask = nullptr;  // [N, C, H, W] or null: dx is zero where relu_mask <= 0

  struct KPos {
    int64_t dy_offset;  // o*4HW + ky*2W + kx
    int w_offset;       // o*4C + t (times one c: + 4c)
    bool valid;
  };
  struct ARow {
    const float* p;  // &dy[n, 0, 2i, 2j]
    bool valid;
  };
  struct BRow {
    const float* p;  // &w[0, c, 0]
    bool valid;
  };
  using CRow = MaskedOutputRow;  // dx[n, 0, i, j] and the mask there

  __host__ __device__ int64_t k_tiles(int bk) const { return ceil_div(K, bk); }
  __device__ KPos k_pos(int64_t tile, int bk, int kk) const {
    const int k = static_cast<int>(tile) * bk + kk;
    const int o = k >> 2, t = k & 3;
    return {static_cast<int64_t>(o) * 4 * H * W + (t >> 1) * (2 * W) + (t & 1), o * 4 * C + t,
            k < K};
  }
  __device__ ARow a_row(int64_t m) const {
    if (m >= M) return {dy, false};
    const PixelIndex p = pixel_index(m, H, W);
    return {dy + p.n * O * 4 * H * W + static_cast<int64_t>(2 * p.i) * (2 * W) + 2 * p.j, true};
  }
  __device__ BRow b_row(int c) const { return {w + static_cast<int64_t>(c) * 4, c < cols}; }
  __device__ const float* a_src(const ARow& r, const KPos& kp) const {
    return r.valid && kp.valid ? r.p + kp.dy_offset : nullptr;
  }
  __device__ const float* b_src(const BRow& r, const KPos& kp) const {
    return r.valid && kp.valid ? r.p + kp.w_offset : nullptr;
  }
  __device__ CRow c_row(int64_t m) const {
    const PixelIndex p = pixel_index(m, H, W);
    return CRow::at(dx, relu_mask, p.n * C * H * W + p.pix);
  }
  __device__ void store(const CRow& r, int c, float v) const {
    r.store(static_cast<int64_t>(c) * H * W, v);
  }
  // the same in two steps (ViewReadsBeforeStore, implicit_gemm.cuh)
  static constexpr bool kReadsBeforeStore = true;
  __device__ float store_input(const CRow& r, int c) const {
    return r.input(static_cast<int64_t>(c) * H * W);
  }
  __device__ void store_with(const CRow& r, int c, float v, float mask_value) const {
    r.store_with(static_cast<int64_t>(c) * H * W, v, mask_value);
  }
};

// dw[c, (o,t)]: A[c, k] = x[n, c, pixel k] (contiguous in k), B[k, (o,t)] = dy[n, o, 2i+ky, 2j+kx].
// K is walked image by image in slices of bk pixels that never straddle two images (as in
// Conv3x3BackwardWeightGemm); `out` is dw, or the split partials [splits, O, C, 4].
struct Upconv2x2BackwardWeightGemm {
  static constexpr bool kWeightGradient = true;  // K runs over pixels (v6's wide tile: run_v6)
  static constexpr bool kARowsContiguous = false;  // A rows: x[:, c, :, :], contiguous in k
  static constexpr bool kBRowsContiguous = false;  // B^T rows: dy[:, o, ky::2, kx::2]
  static constexpr bool kVecA = true, kVecB = false;
  const float* x;
  const float* dy;
  float* out;
  int C, H, W, O;
  int64_t M;             // C
  int cols;              // 4O
  int64_t split_stride;  // O*C*4: the distance between two splits' partials
  int64_t images;        // N

  struct KPos {
    int64_t x_offset;   // n*C*HW + pix
    int64_t dy_offset;  // n*O*4HW + 2i*2W + 2j
    bool valid;
  };
  struct ARow {
    const float* p;  // &x[0, c, 0, 0]
    bool valid;
  };
  struct BRow {
    int64_t offset;  // o*4HW + ky*2W + kx
    bool valid;
  };
  struct CRow {
    float* p;  // &out[split, 0, c, 0]
  };

  __host__ __device__ int64_t tiles_per_image(int bk) const {
    return ceil_div(static_cast<int64_t>(H) * W, static_cast<int64_t>(bk));
  }
  __host__ __device__ int64_t k_tiles(int bk) const { return images * tiles_per_image(bk); }
  __device__ KPos k_pos(int64_t tile, int bk, int kk) const {
    const int64_t per_image = tiles_per_image(bk);
    const int64_t n = tile / per_image;
    const int pix = static_cast<int>(tile - n * per_image) * bk + kk;
    const int i = pix / W, j = pix - i * W;
    const int64_t hw = static_cast<int64_t>(H) * W;
    return {n * C * hw + pix, n * O * 4 * hw + static_cast<int64_t>(2 * i) * (2 * W) + 2 * j,
            pix < hw};
  }
  __device__ ARow a_row(int64_t c) const {
    return {x + c * H * W, c < M};
  }
  __device__ BRow b_row(int col) const {
    const int o = col >> 2, t = col & 3;
    return {static_cast<int64_t>(o) * 4 * H * W + (t >> 1) * (2 * W) + (t & 1), col < cols};
  }
  __device__ const float* a_src(const ARow& r, const KPos& kp) const {
    return r.valid && kp.valid ? r.p + kp.x_offset : nullptr;
  }
  __device__ const float* b_src(const BRow& r, const KPos& kp) const {
    return r.valid && kp.valid ? dy + kp.dy_offset + r.offset : nullptr;
  }
  __device__ CRow c_row(int64_t c) const {
    return {out + static_cast<int64_t>(blockIdx.z) * split_stride + c * 4};
  }
  __device__ void store(const CRow& r, int col, float v) const {
    r.p[static_cast<int64_t>(col >> 2) * M * 4 + (col & 3)] = v;
  }
};

// =================================================================================================
// Launchers
// =================================================================================================

namespace {

bool upconv_uses_gemm(Conv3x3Version version) { return is_gemm_version(version); }  // v3-v6

}  // namespace

void launch_upconv2x2_forward(const float* x, const float* w, const float* b, float* y, int N,
                              int C, int H, int W, int O, Conv3x3Version version,
                              cudaStream_t stream) {
  version = gemm_version(version);  // v7, v8, v9: the GEMMs of v6, v5, v3
  const int64_t total = static_cast<int64_t>(N) * O * 4 * H * W;
  if (total == 0) return;
  if (upconv_uses_gemm(version)) {
    const Upconv2x2ForwardGemm g{x, w, b, y, C, H, W, O, static_cast<int64_t>(N) * H * W, 4 * O, C};
    run_output_gemm("upconv2x2_forward", g, version, false, stream);
    return;
  }
  launch_kernel("upconv2x2_forward_v1_direct", upconv2x2_forward_v1_direct, dim3(grid_1d(total)),
                dim3(kBlock1d), stream, x, w, b, y, N, C, H, W, O);
}

void launch_upconv2x2_backward_data(const float* dy, const float* w, const float* relu_mask,
                                    float* dx, int N, int C, int H, int W, int O,
                                    Conv3x3Version version, cudaStream_t stream) {
  version = gemm_version(version);  // v7, v8, v9: the GEMMs of v6, v5, v3
  const int64_t total = static_cast<int64_t>(N) * C * H * W;
  if (total == 0) return;
  if (upconv_uses_gemm(version)) {
    const Upconv2x2BackwardDataGemm g{dy, w, dx, C, H, W, O, static_cast<int64_t>(N) * H * W, C,
                                      4 * O, relu_mask};
    // 16-byte copies of B = w[o, c, 0:4]: every such group is aligned when w is
    run_output_gemm("upconv2x2_backward_data", g, version, aligned16(w), stream);
    return;
  }
  launch_kernel("upconv2x2_backward_data_v1_direct", upconv2x2_backward_data_v1_direct,
                dim3(grid_1d(total)), dim3(kBlock1d), stream, dy, w, relu_mask, dx, N, C, H, W, O);
}

void launch_upconv2x2_backward_weight(const float* x, const float* dy, float* dw, float* db, int N,
                                      int C, int H, int W, int O, Conv3x3Version version,
                                      cudaStream_t stream) {
  version = gemm_version(version);  // v7, v8, v9: the GEMMs of v6, v5, v3
  const int64_t count = static_cast<int64_t>(O) * C * 4;  // elements of dw
  if (upconv_uses_gemm(version) && count > 0) {
    const std::string name = std::string("upconv2x2_backward_weight_") + version_name(version);
    // The split of the pixel sum: plan_weight_gemm's, from the shapes alone (as for conv3x3), or
    // a measured plan
    const int64_t plane = static_cast<int64_t>(H) * W;
    // 16-byte copies of A = x[n, c, pixels] when every plane is a whole number of them
    const bool vec_a = plane % 4 == 0 && aligned16(x);
    run_weight_gemm("upconv2x2_backward_weight", version, C, int64_t{4} * O, N, plane, dw, count,
                    stream, [&](float* out, const GemmTile& tile, int splits) {
                      const Upconv2x2BackwardWeightGemm g{x, dy, out, C, H, W, O, C, 4 * O, count, N};
                      launch_gemm(name, g, version, tile, splits, vec_a, false, stream);
                    });
  } else if (count > 0) {
    const int64_t blocks = static_cast<int64_t>(O) * C;
    if (blocks > INT32_MAX)
      throw std::runtime_error("upconv2x2_backward_weight: O*C = " + std::to_string(blocks) +
                               " exceeds the grid limit");
    launch_kernel("upconv2x2_backward_weight_v1_block_per_oc",
                  upconv2x2_backward_weight_v1_block_per_oc, dim3(static_cast<unsigned>(blocks)),
                  dim3(kReduceBlock), stream, x, dy, dw, N, C, H, W, O);
  }
  launch_bias_backward(dy, db, N, O, static_cast<int64_t>(4) * H * W, stream);
}

}  // namespace unet
