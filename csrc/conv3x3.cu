// conv3x3.cu: valid 3x3 convolution (cross-correlation), stride 1, no padding, in nine versions.
//
// Layout (strides in elements, all buffers C-contiguous float32):
//   x   [N, C, H, W]      input activations        strides (C*H*W, H*W, W, 1)
//   w   [O, C, 3, 3]      weights (OIHW)           strides (C*9, 9, 3, 1)
//   b   [O]               bias
//   y   [N, O, P, Q]      output, P = H-2, Q = W-2 strides (O*P*Q, P*Q, Q, 1)
//   dy  [N, O, P, Q]      gradient of the output
//   dx  [N, C, H, W]      gradient of the input
//   dw  [O, C, 3, 3], db [O]   gradients of the weights and the bias (db: launch_bias_backward)
//
// The three directions as matrix products (docs/CONV3X3.md draws them), k = (c, ky, kx) =
// 9c + 3ky + kx:
//   forward          y[m, o]   = sum_k A[m, k] B[k, o]   M = N*P*Q pixels, N_gemm = O, K = 9C
//                    A[m, k]   = x[n, c, i+ky, j+kx] for m = (n, i, j) (im2col, never stored),
//                    B[k, o]   = w[o, k] (w read as [O, 9C])
//   backward data    dx[m, c]  = sum_k A[m, k] B[k, c]   M = N*H*W pixels, N_gemm = C, K = 9O
//                    A[m, k]   = dy[n, o, yy-2+ry, xx-2+rx] (zero outside dy) for m = (n, yy, xx),
//                    k = (o, ry, rx), B[k, c] = w[o, c, 2-ry, 2-rx]: a full correlation with the
//                    flipped kernel. The GEMM versions read B from wf[c, k] (conv3x3_flip_weights,
//                    into a workspace): rows contiguous in k, copied 16 bytes at a time
//   backward weight  dw[o, j]  = sum_k A[o, k] B[k, j]   M = O, N_gemm = 9C, K = N*P*Q pixels
//                    A[o, k]   = dy[n, o, i, jj] for k = (n, i, jj), B[k, (c, ky, kx)] =
//                    x[n, c, i+ky, jj+kx]
//
// Versions, selected by name (the registry is kConv3x3Versions in launchers.h; Python:
// unet_cuda.ops.cuda.set_conv3x3_version). Each changes one idea over the one before:
//   version      what it changes, and why                               H100 82e8d82 H100 53cf464
//   v1_direct    one thread per output; operands straight from global memory  4.1-6.5     4.1-6.5
//   v2_smem      input tile + halo and weight slice staged in shared memory   8.6-10.3    8.6-10.3
//   v3_igemm     implicit GEMM; 8x8 outputs per thread (16 loads, 64 FFMAs)  17.4-19.4   17.2-18.7
//   v4_tf32_mma  v3's GEMM on TF32 tensor cores (mma.sync), cp.async x2       36.4-39.6   46.7-63.5
//   v5_bf16_mma  bf16 tensor cores (twice v4's rate), 4-stage cp.async        43.9-48.4   57.1-75.3
//   v6_tf32_wgmma Hopper (sm_90a): warpgroup MMA, shared-memory descriptors  36.5-54.1   55.4-80.3
//   v7_tf32_halo  v6 with each input window copied once for the nine taps       (not yet measured)
//                 (forward and backward data; conv3x3_halo.cuh); v6 for the rest
//   v8_bf16_halo  v7 in bf16: the window rounded into a bf16 one per 16 channels, (not yet measured)
//                 bf16 weights, wgmma k16 (Hopper); v5 for the rest
//   v9_fp32_halo  v7's window on the CUDA cores: FP32 FFMA, 8x8 outputs per     (not yet measured)
//                 thread (9 loads, 192 FFMAs), any GPU; its own weight gradient
//                 (8 x 9 sums per thread, 5 loads per 72 FFMAs); v3 for the rest
// (TFLOP/s, forward and both gradients together at layers d1b, d3b, d4b and b2, from
// bench/results/results-82e8d82-h100-80gb-hbm3.json and results-53cf464-h100-80gb-hbm3.json; the
// copies and the K order of v4-v6 changed in between; the table per layer: docs/CONV3X3.md).
// v4-v6 walk K tap by tap where the channels allow (the tap-major views below).
// v1-v3 and v9 compute in FP32 (FFMA). v4 rounds its operands to TF32 (10-bit mantissa, cvt.rna) and
// accumulates in FP32: expect relative errors around 1e-3, not 1e-6. v5 rounds them to bf16
// (7-bit mantissa, round to nearest even), FP32 sums: relative errors around 1e-2. The precision
// modes of unet_cuda (fp32, tf32, bf16) are these versions; every buffer stays float32.
//
// Kernels:
//   conv3x3_forward_v1_direct: one thread per output element y[n,o,i,j]; sums c, ky, kx straight
//     from global memory, adds b[o], optionally applies ReLU (NaN passes through, like np.maximum).
//   conv3x3_backward_data_v1_direct: one thread per input element dx[n,c,y,x]; gathers the up to
//     nine dy[n,o,y-ky,x-kx] that the element contributed to, for every o (no atomics).
//   conv3x3_backward_weight_v1_block_per_oc: one block per (o, c); each thread keeps nine partial
//     sums over its share of the N*P*Q output pixels (fixed strided assignment), then nine
//     fixed-order block sums give dw[o,c,:,:].
//   conv3x3_{forward,backward_data,backward_weight}_v2_smem: a block owns a tile of pixels and a
//     group of channels; it loops over the summed channels (or pixels) a slice at a time, staging
//     the slice in shared memory, where every thread of the block reuses it.
//   conv3x3_v3_igemm<Gemm, Tile>: one kernel for the three directions: Gemm (Conv3x3ForwardGemm,
//     Conv3x3BackwardDataGemm, Conv3x3BackwardWeightGemm) says where A[m, k] and B[k, n] live and
//     where an output goes; the kernel stages BK-deep tiles of A and B in shared memory (the next
//     tile loaded into registers while the current one is used) and each thread accumulates a
//     TM x TN block of outputs in registers.
//   conv3x3_v4_tf32_mma<Gemm, Tile, VEC_A, VEC_B>: the same tiles, copied by cp.async into one of
//     two shared buffers while the warps multiply the other one with mma.sync.m16n8k8 (TF32 in,
//     FP32 accumulators). VEC_A / VEC_B: 16-byte copies where four consecutive k are contiguous
//     and aligned in memory (the launcher checks; 4-byte copies otherwise).
//   conv3x3_v5_bf16_mma<Gemm, Tile, VEC_A, VEC_B>: v4's tiles and copies, kV5Stages of them in
//     flight in dynamic shared memory; the fragments are rounded to bf16 pairs as they are read
//     from shared memory and multiplied with mma.sync.m16n8k16 (bf16 in, FP32 accumulators).
//   conv3x3_v6_tf32_wgmma<Gemm, Tile, VEC_A, VEC_B>: two warpgroups of a BM x BN block (128 x
//     128; for 64 columns 256 x 64; for the weight gradients of 9C a multiple of 256, 128 x 256,
//     and of O <= 64 with 9C a multiple of 192, 64 x 192, the warpgroups splitting the columns),
//     each issuing wgmma.mma_async.m64nNk8 (N = 64, 96 or 128) for each 64 of its rows and N of
//     its columns (TF32, operands read by the tensor cores from shared memory in the canonical
//     K-major layout), fed by v5's cp.async pipeline (4 stages; 6 of half the K for 128 x 256).
//   conv3x3_v7_tf32_halo<Gemm, Tile> (conv3x3_halo.cuh): a block's 16 x 8 output patch by 128
//     output channels (16 x 16 by 64); per slice of 8 input channels the patch's input window
//     (with its 2-pixel border) is copied once, and the nine taps' A operands are nine wgmma
//     descriptors into it; conv3x3_halo_weights lays the weights out as its stages hold them.
//   conv3x3_v8_bf16_halo<Gemm, Tile>: the same in bf16, 16 channels a slice, the window rounded
//     into a bf16 copy of it in shared memory before its products.
//   conv3x3_v9_fp32_halo<Gemm, Tile>: v7's patches and window (as planes of 20-float rows) on the
//     CUDA cores: each thread sums 8 pixels of an output row by 8 output channels in registers,
//     reading 10 window pixels per channel and kernel row for its three kx; two stages, two blocks
//     per SM; the outputs staged in shared memory for stores of consecutive pixels.
//   conv3x3_v9_fp32_halo_weight<Tile>: v9's weight gradient: per patch of 4 x 16 output pixels,
//     dy for 128 (64) output channels and the x window for 16 (32) input channels staged once;
//     each thread sums 8 output channels by one input channel's 9 taps, walking the patch's rows
//     with the 3 x 3 x values in registers; the patches split over blockIdx.z.
//   conv3x3_v6_probe: answers whether this build holds the sm_90a code v6 needs.
//   conv3x3_split_k_reduce: dw = sum over the splits of the weight-gradient partials, in split
//     order.
//   conv3x3_concat_zero_skip_border: zeros dskip outside the crop window (below).
//   conv3x3_flip_weights: wf[c, o, j] = w[o, c, 8-j], the backward data's B for the GEMM versions.
//   conv3x3_tap_major_weights / conv3x3_flip_weights_tap_major: the forward's and the backward
//     data's B in tap-major K order (tap_major_k: [O, 9C] and [C, 9O]) for the tap-major views.
//   conv3x3_backward_weight_few_channels: the weight gradient of a layer with C <= 2 input channels
//     (the first layer) in the GEMM versions: one block per (o, pixel slice), 9C sums per thread.
//
// The concatenated input. The decoder's first convolution of each level reads [up, centre crop of
// skip] (csrc/crop_concat.cu): the Conv3x3Concat*Gemm views let the GEMM versions (v3-v5) read
// the two tensors where they are, so the concatenation is never stored (launch_conv3x3_concat_*):
//   up    [N, Cu, H, W]      input channels c < Cu
//   skip  [N, Cs, Hs, Ws]    input channels Cu + c', read at (oy, ox) = ((Hs-H)/2, (Ws-W)/2)
//   dup   [N, Cu, H, W], dskip [N, Cs, Hs, Ws] (0 outside the crop window)
// Same tiles, same sums in the same order as crop_concat followed by the plain convolution: the
// same bits.
//
// Determinism: no atomics anywhere. Every output is one thread's sum in a fixed order. The weight
// gradient of v2-v5 splits its pixel sum (split-K) into a number of slices that depends on the
// shapes only (never on the GPU): each slice writes its partial dw to a workspace, and
// conv3x3_split_k_reduce adds the partials in slice order. Same shapes, same bits, on any GPU.
//
// Bounds: every version handles any N, C, O >= 0 and H, W >= 3 (the binding checks them): the
// tiles that run past an edge load zeros and store nothing. 64-bit offsets wherever a product of
// dimensions may pass 2^31.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "common.cuh"
#include "implicit_gemm.cuh"
#include "conv3x3_halo.cuh"
#include "launchers.h"
#include "reduce.cuh"

namespace unet {

// Zero-filled read: x[offset] when `ok`, else 0 (and no memory access at all).
__device__ __forceinline__ float load_or_zero(bool ok, const float* p, int64_t offset) {
  return ok ? p[offset] : 0.0f;
}

// =================================================================================================
// v1: direct, one thread per output element, everything from global memory
// =================================================================================================

__global__ void conv3x3_forward_v1_direct(const float* __restrict__ x, const float* __restrict__ w,
                                          const float* __restrict__ b, float* __restrict__ y,
                                          int N, int C, int H, int W, int O, bool relu) {
  const int P = H - 2, Q = W - 2;
  const int64_t total = static_cast<int64_t>(N) * O * P * Q;
  const int64_t plane = static_cast<int64_t>(H) * W;
  for (int64_t e = global_thread(); e < total; e += grid_stride()) {
    const int j = static_cast<int>(e % Q);
    const int i = static_cast<int>((e / Q) % P);
    const int o = static_cast<int>((e / (static_cast<int64_t>(P) * Q)) % O);
    const int64_t n = e / (static_cast<int64_t>(P) * Q * O);
    const float* xp = x + n * C * plane + static_cast<int64_t>(i) * W + j;  // x[n, 0, i, j]
    const float* wp = w + static_cast<int64_t>(o) * C * 9;                  // w[o, 0, 0, 0]
    float acc = b[o];
    for (int c = 0; c < C; ++c, xp += plane, wp += 9) {
      for (int ky = 0; ky < 3; ++ky)
        for (int kx = 0; kx < 3; ++kx) acc += xp[ky * W + kx] * wp[ky * 3 + kx];
    }
    y[e] = (relu && acc < 0.0f) ? 0.0f : acc;
  }
}

__global__ void conv3x3_backward_data_v1_direct(const float* __restrict__ dy,
                                                const float* __restrict__ w,
                                                const float* __restrict__ relu_mask,
                                                float* __restrict__ dx, int N, int C, int H, int W,
                                                int O) {
  const int P = H - 2, Q = W - 2;
  const int64_t total = static_cast<int64_t>(N) * C * H * W;
  const int64_t out_plane = static_cast<int64_t>(P) * Q;
  for (int64_t e = global_thread(); e < total; e += grid_stride()) {
    const int xx = static_cast<int>(e % W);
    const int yy = static_cast<int>((e / W) % H);
    const int c = static_cast<int>((e / (static_cast<int64_t>(H) * W)) % C);
    const int64_t n = e / (static_cast<int64_t>(H) * W * C);
    float acc = 0.0f;
    for (int o = 0; o < O; ++o) {
      const float* dyp = dy + (n * O + o) * out_plane;     // dy[n, o, 0, 0]
      const float* wp = w + (static_cast<int64_t>(o) * C + c) * 9;  // w[o, c, 0, 0]
      for (int ky = 0; ky < 3; ++ky) {
        const int i = yy - ky;
        if (i < 0 || i >= P) continue;
        for (int kx = 0; kx < 3; ++kx) {
          const int j = xx - kx;
          if (j < 0 || j >= Q) continue;
          acc += dyp[static_cast<int64_t>(i) * Q + j] * wp[ky * 3 + kx];
        }
      }
    }
    dx[e] = relu_masked(acc, relu_mask, e);
  }
}

__global__ void conv3x3_backward_weight_v1_block_per_oc(const float* __restrict__ x,
                                                        const float* __restrict__ dy,
                                                        float* __restrict__ dw, int N, int C,
                                                        int H, int W, int O) {
  __shared__ float scratch[kWarp];
  const int o = static_cast<int>(blockIdx.x / C);
  const int c = static_cast<int>(blockIdx.x % C);
  const int P = H - 2, Q = W - 2;
  const int64_t out_plane = static_cast<int64_t>(P) * Q;
  const int64_t in_plane = static_cast<int64_t>(H) * W;
  float acc[9] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  for (int n = 0; n < N; ++n) {
    const float* dyp = dy + (static_cast<int64_t>(n) * O + o) * out_plane;  // dy[n, o, 0, 0]
    const float* xp = x + (static_cast<int64_t>(n) * C + c) * in_plane;     // x[n, c, 0, 0]
    for (int64_t pix = threadIdx.x; pix < out_plane; pix += blockDim.x) {
      const int i = static_cast<int>(pix / Q);
      const int j = static_cast<int>(pix % Q);
      const float g = dyp[pix];
      const float* xw = xp + static_cast<int64_t>(i) * W + j;  // x[n, c, i, j]
      for (int ky = 0; ky < 3; ++ky)
        for (int kx = 0; kx < 3; ++kx) acc[ky * 3 + kx] += g * xw[ky * W + kx];
    }
  }
  for (int t = 0; t < 9; ++t) {
    const float sum = block_sum(acc[t], scratch);
    if (threadIdx.x == 0) dw[static_cast<int64_t>(blockIdx.x) * 9 + t] = sum;
  }
}

// =================================================================================================
// v2: shared-memory tiling. v1 reads every input value from global memory 9 times per output
// channel; here a block stages a slice once and all its threads reuse it from shared memory.
// =================================================================================================

// Forward and backward data: a block computes a kV2Tile x kV2Tile tile of pixels (one per thread)
// for kV2Group channels (each thread keeps kV2Group sums, so each staged value it reads feeds
// kV2Group FMAs), summing over the other channels kV2Slice at a time.
constexpr int kV2Tile = 16;             // 16 x 16 pixels = 256 threads, a whole number of warps
constexpr int kV2Halo = kV2Tile + 2;    // the input rows/columns a 16-wide output tile reads
constexpr int kV2Group = 8;             // output channels per block (sums per thread)
constexpr int kV2Slice = 8;             // summed channels staged per step: 8*18*18 + 8*8*9 floats
                                        // = 12.7 KB of shared memory, several blocks per SM
constexpr int kV2Threads = kV2Tile * kV2Tile;
// The v2 kernels declare __launch_bounds__(threads, 1): with the thread count alone, ptxas held
// some of them to 64 registers and spilled their sums to local memory.

// Blocks of the pixel tiles: x = image * tiles_y * tiles_x + tile, decoded here.
struct V2TileOrigin {
  int64_t n;
  int row0, col0;
};
__device__ inline V2TileOrigin v2_tile_origin(int64_t block, int rows, int cols, int tile_rows,
                                              int tile_cols) {
  const int tiles_x = ceil_div(cols, tile_cols);
  const int tiles_y = ceil_div(rows, tile_rows);
  const int tx = static_cast<int>(block % tiles_x);
  const int64_t rest = block / tiles_x;
  const int ty = static_cast<int>(rest % tiles_y);
  return {rest / tiles_y, ty * tile_rows, tx * tile_cols};
}

__global__ void __launch_bounds__(kV2Threads, 1)
    conv3x3_forward_v2_smem(const float* __restrict__ x, const float* __restrict__ w,
                            const float* __restrict__ b, float* __restrict__ y, int N, int C,
                            int H, int W, int O, bool relu) {
  __shared__ float s_x[kV2Slice][kV2Halo][kV2Halo];  // x[n, c0+cc, i0+r, j0+q]
  __shared__ float s_w[kV2Group][kV2Slice][9];        // w[o0+oo, c0+cc, :, :]
  const int P = H - 2, Q = W - 2;
  const V2TileOrigin t = v2_tile_origin(blockIdx.x, P, Q, kV2Tile, kV2Tile);
  const int o0 = blockIdx.y * kV2Group;
  const int tx = threadIdx.x % kV2Tile, ty = threadIdx.x / kV2Tile;
  const int64_t plane = static_cast<int64_t>(H) * W;
  const float* xn = x + t.n * C * plane;  // x[n, 0, 0, 0]

  float acc[kV2Group];
#pragma unroll
  for (int oo = 0; oo < kV2Group; ++oo) acc[oo] = 0.0f;

  for (int c0 = 0; c0 < C; c0 += kV2Slice) {
    // Stage the input slice (zeros past the channels and the image) and the weight slice.
    for (int e = threadIdx.x; e < kV2Slice * kV2Halo * kV2Halo; e += kV2Threads) {
      const int cc = e / (kV2Halo * kV2Halo), r = (e / kV2Halo) % kV2Halo, q = e % kV2Halo;
      const int c = c0 + cc, yy = t.row0 + r, xx = t.col0 + q;
      s_x[cc][r][q] = load_or_zero(c < C && yy < H && xx < W, xn,
                                   c * plane + static_cast<int64_t>(yy) * W + xx);
    }
    for (int e = threadIdx.x; e < kV2Group * kV2Slice * 9; e += kV2Threads) {
      const int oo = e / (kV2Slice * 9), cc = (e / 9) % kV2Slice, tap = e % 9;
      const int o = o0 + oo, c = c0 + cc;
      s_w[oo][cc][tap] =
          load_or_zero(o < O && c < C, w, (static_cast<int64_t>(o) * C + c) * 9 + tap);
    }
    __syncthreads();
    for (int cc = 0; cc < kV2Slice; ++cc) {
      float v[9];  // the 3x3 window of this thread's pixel, read once for all kV2Group channels
#pragma unroll
      for (int tap = 0; tap < 9; ++tap) v[tap] = s_x[cc][ty + tap / 3][tx + tap % 3];
#pragma unroll
      for (int oo = 0; oo < kV2Group; ++oo)
#pragma unroll
        for (int tap = 0; tap < 9; ++tap) acc[oo] = fmaf(v[tap], s_w[oo][cc][tap], acc[oo]);
    }
    __syncthreads();
  }

  const int i = t.row0 + ty, j = t.col0 + tx;
  if (i >= P || j >= Q) return;  // after the last barrier: nothing left to wait for
#pragma unroll
  for (int oo = 0; oo < kV2Group; ++oo) {
    const int o = o0 + oo;
    if (o >= O) break;
    const float v = acc[oo] + b[o];
    y[((t.n * O + o) * P + i) * Q + j] = (relu && v < 0.0f) ? 0.0f : v;
  }
}

// dx[n, c, yy, xx] = sum over o, ky, kx of dy[n, o, yy-ky, xx-kx] w[o, c, ky, kx]: the forward's
// structure with dy staged from two rows/columns before the tile (zeros outside dy) and the taps
// read flipped.
__global__ void __launch_bounds__(kV2Threads, 1)
    conv3x3_backward_data_v2_smem(const float* __restrict__ dy, const float* __restrict__ w,
                                  const float* __restrict__ relu_mask, float* __restrict__ dx,
                                  int N, int C, int H, int W, int O) {
  __shared__ float s_dy[kV2Slice][kV2Halo][kV2Halo];  // dy[n, o0+oo, y0-2+r, x0-2+q]
  __shared__ float s_w[kV2Group][kV2Slice][9];         // w[o0+oo, c0+cc, :, :] as [cc][oo]
  const int P = H - 2, Q = W - 2;
  const V2TileOrigin t = v2_tile_origin(blockIdx.x, H, W, kV2Tile, kV2Tile);
  const int c0 = blockIdx.y * kV2Group;
  const int tx = threadIdx.x % kV2Tile, ty = threadIdx.x / kV2Tile;
  const int64_t out_plane = static_cast<int64_t>(P) * Q;
  const float* dyn = dy + t.n * O * out_plane;  // dy[n, 0, 0, 0]

  float acc[kV2Group];
#pragma unroll
  for (int cc = 0; cc < kV2Group; ++cc) acc[cc] = 0.0f;

  for (int o0 = 0; o0 < O; o0 += kV2Slice) {
    for (int e = threadIdx.x; e < kV2Slice * kV2Halo * kV2Halo; e += kV2Threads) {
      const int oo = e / (kV2Halo * kV2Halo), r = (e / kV2Halo) % kV2Halo, q = e % kV2Halo;
      const int o = o0 + oo, i = t.row0 - 2 + r, j = t.col0 - 2 + q;
      s_dy[oo][r][q] = load_or_zero(o < O && i >= 0 && i < P && j >= 0 && j < Q, dyn,
                                    o * out_plane + static_cast<int64_t>(i) * Q + j);
    }
    for (int e = threadIdx.x; e < kV2Group * kV2Slice * 9; e += kV2Threads) {
      const int cc = e / (kV2Slice * 9), oo = (e / 9) % kV2Slice, tap = e % 9;
      const int o = o0 + oo, c = c0 + cc;
      s_w[cc][oo][tap] =
          load_or_zero(o < O && c < C, w, (static_cast<int64_t>(o) * C + c) * 9 + tap);
    }
    __syncthreads();
    for (int oo = 0; oo < kV2Slice; ++oo) {
      float v[9];  // v[ky*3+kx] = dy[yy-ky, xx-kx]
#pragma unroll
      for (int tap = 0; tap < 9; ++tap) v[tap] = s_dy[oo][ty + 2 - tap / 3][tx + 2 - tap % 3];
#pragma unroll
      for (int cc = 0; cc < kV2Group; ++cc)
#pragma unroll
        for (int tap = 0; tap < 9; ++tap) acc[cc] = fmaf(v[tap], s_w[cc][oo][tap], acc[cc]);
    }
    __syncthreads();
  }

  const int yy = t.row0 + ty, xx = t.col0 + tx;
  if (yy >= H || xx >= W) return;
#pragma unroll
  for (int cc = 0; cc < kV2Group; ++cc) {
    const int c = c0 + cc;
    if (c >= C) break;
    const int64_t e = ((t.n * C + c) * H + yy) * W + xx;
    dx[e] = relu_masked(acc[cc], relu_mask, e);
  }
}

// Backward weight: a block owns kV2WOuts x kV2WIns (o, c) pairs, one per thread with its nine sums,
// and walks its share (split) of the pixel tiles of all images: each step stages dy for its
// kV2WOuts channels over a kV2WRows x kV2WCols pixel tile and x for its kV2WIns channels over the
// tile plus halo.
constexpr int kV2WOuts = 16;                 // 16 x 16 (o, c) pairs = 256 threads
constexpr int kV2WIns = 16;
constexpr int kV2WRows = 8;                  // 8 x 32 = 256 pixels per step; 32 columns so that a
constexpr int kV2WCols = 32;                 // warp stages 32 consecutive dy values at once
constexpr int kV2WPixels = kV2WRows * kV2WCols;
constexpr int kV2WHaloCols = kV2WCols + 2;
constexpr int kV2WPlane = (kV2WRows + 2) * kV2WHaloCols + 1;  // +1: an odd stride, so the 16
                                                               // channels a warp reads at once
                                                               // fall in 16 different banks
constexpr int kV2WThreads = kV2WOuts * kV2WIns;

__global__ void __launch_bounds__(kV2WThreads, 1)
    conv3x3_backward_weight_v2_smem(const float* __restrict__ x, const float* __restrict__ dy,
                                    float* __restrict__ out, int N, int C, int H, int W, int O) {
  __shared__ float s_dy[kV2WOuts][kV2WPixels];  // 16 KB
  __shared__ float s_x[kV2WIns][kV2WPlane];     // 21.8 KB
  const int P = H - 2, Q = W - 2;
  const int groups_c = ceil_div(C, kV2WIns);
  const int o0 = static_cast<int>(blockIdx.x / groups_c) * kV2WOuts;
  const int c0 = static_cast<int>(blockIdx.x % groups_c) * kV2WIns;
  const int oo = threadIdx.x / kV2WIns, cc = threadIdx.x % kV2WIns;
  const int64_t in_plane = static_cast<int64_t>(H) * W, out_plane = static_cast<int64_t>(P) * Q;
  const int64_t tiles_per_image =
      static_cast<int64_t>(ceil_div(P, kV2WRows)) * ceil_div(Q, kV2WCols);
  int64_t u_begin, u_end;
  split_range(N * tiles_per_image, blockIdx.y, gridDim.y, u_begin, u_end);

  float acc[9];
#pragma unroll
  for (int tap = 0; tap < 9; ++tap) acc[tap] = 0.0f;

  for (int64_t u = u_begin; u < u_end; ++u) {
    const V2TileOrigin t = v2_tile_origin(u, P, Q, kV2WRows, kV2WCols);
    const float* dyn = dy + t.n * O * out_plane;
    const float* xn = x + t.n * C * in_plane;
    for (int e = threadIdx.x; e < kV2WOuts * kV2WPixels; e += kV2WThreads) {
      const int o_ = e / kV2WPixels, p = e % kV2WPixels;
      const int o = o0 + o_, i = t.row0 + p / kV2WCols, j = t.col0 + p % kV2WCols;
      s_dy[o_][p] = load_or_zero(o < O && i < P && j < Q, dyn,
                                 o * out_plane + static_cast<int64_t>(i) * Q + j);
    }
    for (int e = threadIdx.x; e < kV2WIns * (kV2WRows + 2) * kV2WHaloCols; e += kV2WThreads) {
      const int c_ = e / ((kV2WRows + 2) * kV2WHaloCols), rem = e % ((kV2WRows + 2) * kV2WHaloCols);
      const int c = c0 + c_, yy = t.row0 + rem / kV2WHaloCols, xx = t.col0 + rem % kV2WHaloCols;
      s_x[c_][rem] = load_or_zero(c < C && yy < H && xx < W, xn,
                                  c * in_plane + static_cast<int64_t>(yy) * W + xx);
    }
    __syncthreads();
    for (int r = 0; r < kV2WRows; ++r) {
#pragma unroll 4
      for (int q = 0; q < kV2WCols; ++q) {
        const float g = s_dy[oo][r * kV2WCols + q];  // zero for pixels past the image
        const float* xw = &s_x[cc][r * kV2WHaloCols + q];
#pragma unroll
        for (int tap = 0; tap < 9; ++tap)
          acc[tap] = fmaf(g, xw[(tap / 3) * kV2WHaloCols + tap % 3], acc[tap]);
      }
    }
    __syncthreads();
  }

  const int o = o0 + oo, c = c0 + cc;
  if (o >= O || c >= C) return;
  float* dst = out + static_cast<int64_t>(blockIdx.y) * O * C * 9 +  // this split's partials
               (static_cast<int64_t>(o) * C + c) * 9;
#pragma unroll
  for (int tap = 0; tap < 9; ++tap) dst[tap] = acc[tap];
}

// =================================================================================================
// The weight gradient of a layer with few input channels (the network's first layer: 1 for
// grayscale microscopy). As a GEMM its output O x 9C is a sliver of one tile (9 of 64 columns at
// C = 1) and nearly all of the tile's work is wasted: 0.65 ms for d1a with v4 on an H200, for
// 0.4 GFLOP. Here each block takes one o and one slice of the N*P*Q pixels (fixed by the shapes);
// its threads keep 9C sums over a strided share of the slice, then 9C fixed-order block sums give
// the slice's partial dw[o], and conv3x3_split_k_reduce adds the slices in order. FP32 in every
// version (a more precise result than the tensor-core modes promise).
// =================================================================================================

constexpr int kFewChannels = 2;        // C up to this takes the kernel below in the GEMM versions
constexpr int kFewChannelsBlock = 256;
constexpr int64_t kFewChannelsMinPixelsPerThread = 16;

__global__ void __launch_bounds__(kFewChannelsBlock)
conv3x3_backward_weight_few_channels(const float* __restrict__ x, const float* __restrict__ dy,
                                     float* __restrict__ out, int N, int C, int H, int W, int O) {
  __shared__ float scratch[kWarp];
  const int o = blockIdx.x;
  const int P = H - 2, Q = W - 2;
  const int64_t PQ = static_cast<int64_t>(P) * Q;
  int64_t begin, end;  // this block's slice of the flattened (n, pixel) range
  split_range(N * PQ, blockIdx.y, gridDim.y, begin, end);
  float acc[9 * kFewChannels];
#pragma unroll
  for (int t = 0; t < 9 * kFewChannels; ++t) acc[t] = 0.0f;
  for (int64_t n = begin / PQ; n < N && n * PQ < end; ++n) {
    const int lo = static_cast<int>(begin > n * PQ ? begin - n * PQ : 0);
    const int hi = static_cast<int>(end < (n + 1) * PQ ? end - n * PQ : PQ);
    const float* dyn = dy + (n * O + o) * PQ;  // dy[n, o, 0, 0]
    for (int pix = lo + static_cast<int>(threadIdx.x); pix < hi; pix += blockDim.x) {
      const int i = pix / Q, j = pix - i * Q;
      const float g = dyn[pix];
#pragma unroll
      for (int c = 0; c < kFewChannels; ++c) {
        if (c >= C) break;
        const float* xw = x + ((n * C + c) * H + i) * static_cast<int64_t>(W) + j;  // x[n, c, i, j]
#pragma unroll
        for (int tap = 0; tap < 9; ++tap) acc[9 * c + tap] = fmaf(g, xw[(tap / 3) * W + tap % 3], acc[9 * c + tap]);
      }
    }
  }
  float* dst = out + (static_cast<int64_t>(blockIdx.y) * O + o) * 9 * C;  // this slice's dw[o]
#pragma unroll
  for (int t = 0; t < 9 * kFewChannels; ++t) {
    if (t >= 9 * C) break;  // uniform across the block: every thread reaches the same block sums
    const float sum = block_sum(acc[t], scratch);
    if (threadIdx.x == 0) dst[t] = sum;
  }
}

// wf[c, o, j] = w[o, c, 8 - j]: the backward data's B (a correlation with the flipped kernel) with
// its rows, one per input channel c, contiguous in k = 9o + j.
__global__ void conv3x3_flip_weights(const float* __restrict__ w, float* __restrict__ wf, int C,
                                     int O) {
  const int64_t total = int64_t{9} * O * C;
  for (int64_t e = global_thread(); e < total; e += grid_stride()) {
    const int j = static_cast<int>(e % 9);
    const int64_t co = e / 9;  // c * O + o
    const int o = static_cast<int>(co % O), c = static_cast<int>(co / O);
    wf[e] = w[(static_cast<int64_t>(o) * C + c) * 9 + (8 - j)];
  }
}

// The tap-major K order (the views below): k = (chunk * 9 + tap) * kTapMajorChannels + ci for
// channel c = chunk * kTapMajorChannels + ci. The 9 taps of one chunk of channels are consecutive
// K tiles, which read nearly the same input rows: the later taps find them in L1.
constexpr int kTapMajorChannels = 32;

// The column of channel c at `tap` in the tap-major K order, and back.
__host__ __device__ constexpr int64_t tap_major_k(int c, int tap) {
  return (int64_t{c / kTapMajorChannels} * 9 + tap) * kTapMajorChannels + c % kTapMajorChannels;
}
// In the integer type of k: the kernels' K tiles pass an int (32-bit divisions by 9, a few
// instructions; an int64_t k makes a 64-bit division, some forty), the weight rearrangements an
// int64_t element index.
struct TapMajorColumn {
  int c, tap;
  template <class Int>
  __host__ __device__ constexpr explicit TapMajorColumn(Int k)  // k / 32 = chunk * 9 + tap
      : c(static_cast<int>(k / kTapMajorChannels / 9 * kTapMajorChannels + k % kTapMajorChannels)),
        tap(static_cast<int>(k / kTapMajorChannels % 9)) {}
};
static_assert(TapMajorColumn(tap_major_k(70, 5)).c == 70 &&
                  TapMajorColumn(tap_major_k(70, 5)).tap == 5,
              "TapMajorColumn inverts tap_major_k");

// wt[o, tap_major_k(c, tap)] = w[o, c, tap]: the forward's B in tap-major K order
// (Conv3x3ForwardTapGemm), C a multiple of kTapMajorChannels.
__global__ void conv3x3_tap_major_weights(const float* __restrict__ w, float* __restrict__ wt,
                                          int C, int O) {
  const int64_t row = int64_t{9} * C, total = O * row;
  for (int64_t e = global_thread(); e < total; e += grid_stride()) {
    const int64_t o = e / row;
    const TapMajorColumn k(e - o * row);
    wt[e] = w[(o * C + k.c) * 9 + k.tap];
  }
}

// wf[c, tap_major_k(o, tap)] = w[o, c, 8 - tap]: the backward data's B in tap-major K order
// (TapMajorBackwardData), O a multiple of kTapMajorChannels.
__global__ void conv3x3_flip_weights_tap_major(const float* __restrict__ w, float* __restrict__ wf,
                                               int C, int O) {
  const int64_t row = int64_t{9} * O, total = C * row;
  for (int64_t e = global_thread(); e < total; e += grid_stride()) {
    const int64_t c = e / row;
    const TapMajorColumn k(e - c * row);  // k.c: the output channel o
    wf[e] = w[(static_cast<int64_t>(k.c) * C + c) * 9 + (8 - k.tap)];
  }
}

// =================================================================================================
// The GEMM views of the three directions (the interface: implicit_gemm.cuh). kARowsContiguous /
// kBRowsContiguous: consecutive m (n) are consecutive in memory. kVecA / kVecB: four consecutive k
// of A (B) can be contiguous and 16-byte aligned (the launcher checks the sizes and the pointer).
// =================================================================================================

struct Conv3x3ForwardGemm {
  static constexpr bool kARowsContiguous = true;   // A rows: pixels of x
  static constexpr bool kBRowsContiguous = false;  // B^T rows: w[o, :], contiguous in k
  static constexpr bool kVecA = false, kVecB = true;  // 16-byte copies possible: of B (w rows)
  const float* x;
  const float* w;
  const float* b;
  float* y;
  int C, H, W, O, P, Q;
  bool relu;
  int64_t M;  // N*P*Q
  int cols;   // O
  int K;      // 9C

  struct KPos {
    int k;
    int64_t x_offset;  // c*H*W + ky*W + kx
    bool valid;
  };
  struct ARow {
    const float* p;  // &x[n, 0, i, j]
    bool valid;
  };
  struct BRow {
    const float* p;  // &w[o, 0, 0, 0]
    bool valid;
  };
  struct CRow {
    float* p;  // &y[n, 0, i, j]
  };

  __host__ __device__ int64_t k_tiles(int bk) const { return ceil_div(K, bk); }
  __device__ KPos k_pos(int64_t tile, int bk, int kk) const {
    const int k = static_cast<int>(tile) * bk + kk;
    const int c = k / 9, tap = k - 9 * c, ky = tap / 3, kx = tap - 3 * ky;
    return {k, static_cast<int64_t>(c) * H * W + ky * W + kx, k < K};
  }
  __device__ ARow a_row(int64_t m) const {
    if (m >= M) return {x, false};
    const PixelIndex p = pixel_index(m, P, Q);
    return {x + p.n * C * H * W + static_cast<int64_t>(p.i) * W + p.j, true};
  }
  __device__ BRow b_row(int n) const {  // past the columns: w itself (CopySource)
    return n < cols ? BRow{w + static_cast<int64_t>(n) * K, true} : BRow{w, false};
  }
  __device__ const float* a_src(const ARow& r, const KPos& kp) const {
    return r.valid && kp.valid ? r.p + kp.x_offset : nullptr;
  }
  __device__ const float* b_src(const BRow& r, const KPos& kp) const {
    return r.valid && kp.valid ? r.p + kp.k : nullptr;
  }
  __device__ CRow c_row(int64_t m) const {
    const PixelIndex p = pixel_index(m, P, Q);
    return {y + p.n * O * P * Q + p.pix};
  }
  __device__ void store(const CRow& r, int o, float v) const {
    v += b[o];
    r.p[static_cast<int64_t>(o) * P * Q] = (relu && v < 0.0f) ? 0.0f : v;
  }
};

struct Conv3x3BackwardDataGemm {
  static constexpr bool kARowsContiguous = true;   // A rows: pixels of dx, read from dy
  static constexpr bool kBRowsContiguous = false;  // B^T rows: wf[c, :], contiguous in k
  static constexpr bool kVecA = false, kVecB = true;  // 16-byte copies possible: of B (wf rows)
  const float* dy;
  const float* wf;  // the flipped weights [C, O, 9]: wf[c, o, 3ry+rx] = w[o, c, 2-ry, 2-rx]
  float* dx;
  int C, H, W, O, P, Q;
  int64_t M;  // N*H*W
  int cols;   // C
  int K;      // 9O
  const float* relu_mask = nullptr;  // [N, C, H, W] or null: dx is zero where relu_mask <= 0

  struct KPos {
    int k, o, ry, rx;  // k = 9o + 3ry + rx reads dy[o, yy-2+ry, xx-2+rx] and wf[c, k]
    bool valid;
  };
  struct ARow {
    const float* p;  // &dy[n, 0, 0, 0]
    int yy, xx;
    bool valid;
  };
  struct BRow {
    const float* p;  // &wf[c, 0]
    bool valid;
  };
  using CRow = MaskedOutputRow;  // dx[n, 0, yy, xx] and the mask there

  __host__ __device__ int64_t k_tiles(int bk) const { return ceil_div(K, bk); }
  __device__ KPos k_pos(int64_t tile, int bk, int kk) const {
    const int k = static_cast<int>(tile) * bk + kk;
    const int o = k / 9, tap = k - 9 * o, ry = tap / 3;
    return {k, o, ry, tap - 3 * ry, k < K};
  }
  __device__ ARow a_row(int64_t m) const {
    if (m >= M) return {dy, 0, 0, false};
    const PixelIndex p = pixel_index(m, H, W);
    return {dy + p.n * O * P * Q, p.i, p.j, true};
  }
  __device__ BRow b_row(int n) const {  // past the columns: wf itself (CopySource)
    return n < cols ? BRow{wf + static_cast<int64_t>(n) * K, true} : BRow{wf, false};
  }
  __device__ const float* a_src(const ARow& r, const KPos& kp) const {
    const int i = r.yy - 2 + kp.ry, j = r.xx - 2 + kp.rx;
    const bool inside = i >= 0 && i < P && j >= 0 && j < Q;
    return r.valid && kp.valid && inside
               ? r.p + static_cast<int64_t>(kp.o) * P * Q + static_cast<int64_t>(i) * Q + j
               : nullptr;
  }
  __device__ const float* b_src(const BRow& r, const KPos& kp) const {
    return r.valid && kp.valid ? r.p + kp.k : nullptr;
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

// K is walked image by image in slices of bk pixels that never straddle two images (the last
// slice of an image is partly past it): a slice's image is one division per slice.
struct Conv3x3BackwardWeightGemm {
  static constexpr bool kWeightGradient = true;  // K runs over pixels (v6's wide tile: run_v6)
  static constexpr bool kARowsContiguous = false;  // A rows: dy[:, o, :, :], contiguous in k
  static constexpr bool kBRowsContiguous = false;  // B^T rows: x[:, c, ky:, kx:], contiguous in k
  static constexpr bool kVecA = true, kVecB = false;  // 16-byte copies possible: of A (dy pixels)
  const float* x;
  const float* dy;
  float* out;             // dw, or the workspace of the split partials [splits, O, 9C]
  int C, H, W, O, P, Q;
  int64_t M;              // O
  int cols;               // 9C
  int64_t split_stride;   // O * 9C: the distance between two splits' partials
  int64_t images;         // N

  struct KPos {
    int64_t dy_offset;  // n*O*P*Q + pix
    int64_t x_offset;   // n*C*H*W + i*W + j
    bool valid;
  };
  struct ARow {
    const float* p;  // &dy[0, o, 0, 0]
    bool valid;
  };
  struct BRow {
    int64_t offset;  // c*H*W + ky*W + kx
    bool valid;
  };
  struct CRow {
    float* p;  // &out[split, o, 0]
  };

  __host__ __device__ int64_t tiles_per_image(int bk) const {
    return ceil_div(static_cast<int64_t>(P) * Q, static_cast<int64_t>(bk));
  }
  __host__ __device__ int64_t k_tiles(int bk) const { return images * tiles_per_image(bk); }
  // Past the image's pixels the offsets are those of its first pixel (past O, or 9C, those of row
  // 0): a_copy / b_copy then still address an element of dy / x (CopySource), which the copy does
  // not read, at a 16-byte aligned address where the 16-byte copies need one (the last pixel would
  // not be). A select, not a branch: v3 computes k_pos for every element it loads. The tile's
  // image is a 32-bit division (run_backward_weight_gemm checks that the tiles number fewer than
  // 2^31): a 64-bit one is a call to a routine.
  struct TilePixel {
    int64_t n;    // the image
    int p, i, j;  // the pixel of dy's plane (the first where not valid), its row and column
    bool valid;
  };
  __device__ TilePixel tile_pixel(int64_t tile, int bk, int kk) const {
    const int per_image = static_cast<int>(tiles_per_image(bk));
    const int n = static_cast<int>(tile) / per_image;
    const int pix = (static_cast<int>(tile) - n * per_image) * bk + kk;
    const bool valid = pix < static_cast<int64_t>(P) * Q;
    const int p = valid ? pix : 0;
    const int i = p / Q;
    return {n, p, i, p - i * Q, valid};
  }
  __device__ KPos k_pos(int64_t tile, int bk, int kk) const {
    const TilePixel t = tile_pixel(tile, bk, kk);
    return {t.n * O * P * Q + t.p, t.n * C * H * W + static_cast<int64_t>(t.i) * W + t.j, t.valid};
  }
  __device__ ARow a_row(int64_t o) const {
    return o < M ? ARow{dy + o * P * Q, true} : ARow{dy, false};
  }
  __device__ BRow b_row(int col) const {
    if (col >= cols) return {0, false};
    const int c = col / 9, tap = col - 9 * c, ky = tap / 3, kx = tap - 3 * ky;
    return {static_cast<int64_t>(c) * H * W + ky * W + kx, true};
  }
  __device__ CopySource a_copy(const ARow& r, const KPos& kp) const {
    return {r.p + kp.dy_offset, r.valid && kp.valid};
  }
  // The pixel's address once per k position, then the row's offset (opaque_pointer: the two are
  // not folded into one sum per copy, shifted and added again).
  __device__ CopySource b_copy(const BRow& r, const KPos& kp) const {
    return {opaque_pointer(x + kp.x_offset) + r.offset, r.valid && kp.valid};
  }
  __device__ CRow c_row(int64_t o) const {
    return {out + static_cast<int64_t>(blockIdx.z) * split_stride + o * cols};
  }
  __device__ void store(const CRow& r, int col, float v) const { r.p[col] = v; }
};

// The decoder's first convolution of each level reads the concatenation [up, centre crop of skip]
// (csrc/crop_concat.cu) without it ever being stored: these three views are the plain ones with a
// second source. Input channels c < Cu come from up [N, Cu, H, W] (the base view's x, dx), the
// others from skip [N, C - Cu, Hs, Ws] at the crop offset (oy, ox) = ((Hs-H)/2, (Ws-W)/2). The
// GEMM kernels (v3-v5) run them unchanged: only where an element of A, B or C lives differs.

struct Conv3x3ConcatForwardGemm : Conv3x3ForwardGemm {
  const float* skip;
  int Cu, Hs, Ws, oy, ox;

  struct KPos : Conv3x3ForwardGemm::KPos {  // x_offset: from the pixel in up, or in skip
    bool in_skip;
  };
  struct ARow {
    const float* up_p;    // &up[n, 0, i, j]
    const float* skip_p;  // &skip[n, 0, i + oy, j + ox]
    bool valid;
  };

  __device__ KPos k_pos(int64_t tile, int bk, int kk) const {
    const int k = static_cast<int>(tile) * bk + kk;
    const int c = k / 9, tap = k - 9 * c, ky = tap / 3, kx = tap - 3 * ky;
    if (c < Cu) return {{k, static_cast<int64_t>(c) * H * W + ky * W + kx, k < K}, false};
    return {{k, static_cast<int64_t>(c - Cu) * Hs * Ws + ky * Ws + kx, k < K}, true};
  }
  __device__ ARow a_row(int64_t m) const {
    if (m >= M) return {x, skip, false};
    const PixelIndex p = pixel_index(m, P, Q);
    return {x + p.n * Cu * H * W + static_cast<int64_t>(p.i) * W + p.j,
            skip + p.n * (C - Cu) * Hs * Ws + static_cast<int64_t>(p.i + oy) * Ws + (p.j + ox), true};
  }
  __device__ const float* a_src(const ARow& r, const KPos& kp) const {
    return r.valid && kp.valid ? (kp.in_skip ? r.skip_p : r.up_p) + kp.x_offset : nullptr;
  }
};

// dx splits into dup [N, Cu, H, W] (the base view's dx) and the crop window of dskip; the rest of
// dskip is zeroed by conv3x3_concat_zero_skip_border.
// The base view's relu_mask is up's ([N, Cu, H, W]); skip_mask is skip's ([N, Cs, Hs, Ws]).
struct Conv3x3ConcatBackwardDataGemm : Conv3x3BackwardDataGemm {
  float* dskip;
  int Cu, Hs, Ws, oy, ox;
  const float* skip_mask = nullptr;

  struct CRow {
    MaskedOutputRow up;    // dup[n, 0, yy, xx]
    MaskedOutputRow skip;  // dskip[n, 0, yy + oy, xx + ox]
  };

  __device__ CRow c_row(int64_t m) const {
    const PixelIndex p = pixel_index(m, H, W);
    return {MaskedOutputRow::at(dx, relu_mask, p.n * Cu * H * W + p.pix),
            MaskedOutputRow::at(dskip, skip_mask, p.n * (C - Cu) * Hs * Ws +
                                                      static_cast<int64_t>(p.i + oy) * Ws + (p.j + ox))};
  }
  // channel c lies in up (c < Cu) or in skip's crop window
  __device__ void store(const CRow& r, int c, float v) const {
    if (c < Cu) r.up.store(static_cast<int64_t>(c) * H * W, v);
    else r.skip.store(static_cast<int64_t>(c - Cu) * Hs * Ws, v);
  }
  __device__ float store_input(const CRow& r, int c) const {
    return c < Cu ? r.up.input(static_cast<int64_t>(c) * H * W)
                  : r.skip.input(static_cast<int64_t>(c - Cu) * Hs * Ws);
  }
  __device__ void store_with(const CRow& r, int c, float v, float mask_value) const {
    if (c < Cu) r.up.store_with(static_cast<int64_t>(c) * H * W, v, mask_value);
    else r.skip.store_with(static_cast<int64_t>(c - Cu) * Hs * Ws, v, mask_value);
  }
};

// B[k, (c, ky, kx)] = x[n, c, i+ky, jj+kx] reads up (the base view's x) or skip.
struct Conv3x3ConcatBackwardWeightGemm : Conv3x3BackwardWeightGemm {
  const float* skip;
  int Cu, Hs, Ws, oy, ox;

  struct KPos : Conv3x3BackwardWeightGemm::KPos {  // x_offset: the pixel's offset in up
    int64_t skip_offset;                             // n*Cs*Hs*Ws + (i+oy)*Ws + (j+ox)
  };
  struct BRow : Conv3x3BackwardWeightGemm::BRow {  // offset: of the tap in up, or in skip
    bool in_skip;
  };

  // As in the base view, what is not read is addressed at the image's first pixel; a row past 9C
  // reads from the part that has channels (up may have none).
  __device__ KPos k_pos(int64_t tile, int bk, int kk) const {
    const TilePixel t = tile_pixel(tile, bk, kk);
    return {{t.n * O * P * Q + t.p, t.n * Cu * H * W + static_cast<int64_t>(t.i) * W + t.j, t.valid},
            t.n * (C - Cu) * Hs * Ws + static_cast<int64_t>(t.i + oy) * Ws + (t.j + ox)};
  }
  __device__ BRow b_row(int col) const {
    if (col >= cols) return {{0, false}, Cu == 0};
    const int c = col / 9, tap = col - 9 * c, ky = tap / 3, kx = tap - 3 * ky;
    if (c < Cu) return {{static_cast<int64_t>(c) * H * W + ky * W + kx, true}, false};
    return {{static_cast<int64_t>(c - Cu) * Hs * Ws + ky * Ws + kx, true}, true};
  }
  __device__ CopySource b_copy(const BRow& r, const KPos& kp) const {
    return {opaque_pointer(r.in_skip ? skip + kp.skip_offset : x + kp.x_offset) + r.offset,
            r.valid && kp.valid};
  }
};

// -------------------------------------------------------------------------------------------------
// Tap-major views (v4-v6). The views above walk K in the weights' own order, k = 9c + tap: the k of
// a tile are all different (channel, tap) pairs, so every copy decodes its k (through the table of
// k positions) and adds its own offset. Ordered by tap within chunks of kTapMajorChannels channels
// instead (tap_major_k: k = (chunk * 9 + tap) * 32 + ci), a K tile of bk k is one tap and bk
// consecutive channels: A[m, k] of a tile is the row's pointer, plus one offset per tile, plus kk
// planes; B's rows are the weights rearranged into that order (conv3x3_tap_major_weights; for the
// backward data, conv3x3_flip_weights_tap_major), contiguous and aligned in k. The nine tiles of a
// chunk read the same channels at nine shifts: most of each tile's A is already in L1 (the 4-byte
// copies are cp.async.ca). The kernels see k_tile (IsTapMajor) and ask it once per tile,
// then a_tile / b_tile once per row (implicit_gemm.cuh, CopySource): no table, no per-copy decode.
// The launchers take them where every K tile of every version is one tap (kTapMajorChannels).
// -------------------------------------------------------------------------------------------------

// A K tile's first k in the tap-major order (tap_major_k): its tap and first channel.
struct TapMajorK {
  int k, c0, ky, kx;
  __device__ explicit TapMajorK(int k_) : k(k_) {
    const TapMajorColumn column(k);
    c0 = column.c;
    ky = column.tap / 3;
    kx = column.tap - 3 * ky;
  }
};

struct Conv3x3ForwardTapGemm : Conv3x3ForwardGemm {  // w: the tap-major weights [O, 9C]
  struct KTile {
    int x_offset;  // c0*H*W + ky*W + kx (an int: tap_major)
    int k;         // tap_major_k(c0, tap): the tile's first column of w
  };
  __device__ KTile k_tile(int64_t tile, int bk) const {
    const TapMajorK t(static_cast<int>(tile) * bk);
    return {t.c0 * H * W + t.ky * W + t.kx, t.k};
  }
  __device__ CopySource a_tile(const ARow& r, const KTile& t) const { return {r.p + t.x_offset, r.valid}; }
  __device__ int a_k_step(const KTile&) const { return H * W; }  // one channel further
  __device__ CopySource b_tile(const BRow& r, const KTile& t) const { return {r.p + t.k, r.valid}; }
};

// The concatenated input: a tile's channels all come from up or all from skip (Cu and Cs multiples
// of kTapMajorChannels, which the launchers check).
struct Conv3x3ConcatForwardTapGemm : Conv3x3ConcatForwardGemm {  // w: [O, 9 (Cu + Cs)]
  struct KTile {
    int offset;  // of channel c0 and the tap, in up or in skip (an int: tap_major)
    int k;
    bool in_skip;
  };
  __device__ KTile k_tile(int64_t tile, int bk) const {
    const TapMajorK t(static_cast<int>(tile) * bk);
    if (t.c0 < Cu) return {t.c0 * H * W + t.ky * W + t.kx, t.k, false};
    return {(t.c0 - Cu) * Hs * Ws + t.ky * Ws + t.kx, t.k, true};
  }
  __device__ CopySource a_tile(const ARow& r, const KTile& t) const {
    return {(t.in_skip ? r.skip_p : r.up_p) + t.offset, r.valid};
  }
  __device__ int a_k_step(const KTile& t) const { return t.in_skip ? Hs * Ws : H * W; }
  __device__ CopySource b_tile(const BRow& r, const KTile& t) const { return {r.p + t.k, r.valid}; }
};

// The backward data, plain (Conv3x3BackwardDataGemm) or into the concatenation's two parts
// (Conv3x3ConcatBackwardDataGemm): K runs over dy's O channels (tap_major_k(o, tap)). wf: [C, 9O].
template <class Base>
struct TapMajorBackwardData : Base {
  using typename Base::ARow;
  using typename Base::BRow;
  struct KTile {
    int o0, ry, rx;
    int k;  // tap_major_k(o0, tap)
  };
  __device__ KTile k_tile(int64_t tile, int bk) const {
    const TapMajorK t(static_cast<int>(tile) * bk);
    return {t.c0, t.ky, t.kx, t.k};
  }
  __device__ CopySource a_tile(const ARow& r, const KTile& t) const {
    const int P = this->P, Q = this->Q;
    const int i = r.yy - 2 + t.ry, j = r.xx - 2 + t.rx;
    const bool valid = r.valid && i >= 0 && i < P && j >= 0 && j < Q;
    // outside dy: the tile's first plane of the row's image (or of image 0), read by nothing.
    // Offsets within an image are ints (tap_major).
    const int plane = t.o0 * P * Q;
    return {r.p + (valid ? plane + i * Q + j : plane), valid};
  }
  __device__ int a_k_step(const KTile&) const { return this->P * this->Q; }
  __device__ CopySource b_tile(const BRow& r, const KTile& t) const { return {r.p + t.k, r.valid}; }
};

namespace {

// The weight-gradient plan of a version: tile size and splits, from the shapes alone.
struct BackwardWeightPlan {
  GemmTile tile{false, 0, 0, 0};  // the GEMM versions' tile (plan_weight_gemm)
  int splits = 1;
};

// The GEMM versions hand a layer with few input channels to conv3x3_backward_weight_few_channels.
bool few_input_channels(Conv3x3Version version, int C) {
  return conv3x3_fuses_concat(version) && C <= kFewChannels;  // conv3x3_fuses_concat: v3-v6
}

// Its slices: two waves of blocks over the O channels, at least kFewChannelsMinPixelsPerThread
// pixels per thread and at most kMaxSplits slices.
int few_channels_splits(int N, int H, int W, int O) {
  const int64_t pixels = static_cast<int64_t>(N) * (H - 2) * (W - 2);
  int64_t s = ceil_div<int64_t>(2 * kTargetBlocks, std::max(O, 1));
  s = std::min(s, pixels / (kFewChannelsBlock * kFewChannelsMinPixelsPerThread));
  s = std::min(s, kMaxSplits);
  return static_cast<int>(std::max<int64_t>(s, 1));
}

// `gemm_only`: the plan of the GEMM itself, for the concatenated input, which never takes the
// few-channels kernel.
BackwardWeightPlan plan_backward_weight(Conv3x3Version version, int N, int C, int H, int W, int O,
                                        bool gemm_only = false) {
  const int64_t P = H - 2, Q = W - 2, cols = int64_t{9} * C;
  const int64_t floats = static_cast<int64_t>(O) * cols;
  BackwardWeightPlan plan;
  switch (version) {
    case Conv3x3Version::kV1Direct:
    case Conv3x3Version::kV7Tf32Halo:  // never asked: their callers take gemm_version (v6, v5, v3)
    case Conv3x3Version::kV8Bf16Halo:
    case Conv3x3Version::kV9Fp32Halo:
      break;
    case Conv3x3Version::kV2Smem: {
      const int64_t tiles = ceil_div<int64_t>(O, kV2WOuts) * ceil_div<int64_t>(C, kV2WIns);
      const int64_t units = N * ceil_div<int64_t>(P, kV2WRows) * ceil_div<int64_t>(Q, kV2WCols);
      plan.splits = plan_splits(tiles, units, kV2WPixels, floats);
      break;
    }
    case Conv3x3Version::kV3Igemm:
    case Conv3x3Version::kV4Tf32Mma:
    case Conv3x3Version::kV5Bf16Mma:
    case Conv3x3Version::kV6Tf32Wgmma: {
      if (!gemm_only && few_input_channels(version, C)) {
        plan.splits = few_channels_splits(N, H, W, O);
        break;
      }
      const WeightGemmPlan gemm = plan_weight_gemm(version, O, cols, N, P * Q);
      plan.tile = gemm.tile;
      plan.splits = gemm.splits;
      break;
    }
  }
  return plan;
}

Conv3x3ForwardGemm forward_gemm(const float* x, const float* w, const float* b, float* y, int N,
                                int C, int H, int W, int O, bool relu) {
  const int P = H - 2, Q = W - 2;
  return {x, w, b, y, C, H, W, O, P, Q, relu, static_cast<int64_t>(N) * P * Q, O, 9 * C};
}

Conv3x3BackwardDataGemm backward_data_gemm(const float* dy, const float* wf, float* dx,
                                           const float* relu_mask, int N, int C, int H, int W,
                                           int O) {
  return {dy, wf, dx, C, H, W, O, H - 2, W - 2, static_cast<int64_t>(N) * H * W, C, 9 * O,
          relu_mask};
}

// The weights rearranged into a workspace by one of conv3x3_flip_weights (the backward data's B,
// [C, O, 9]), conv3x3_tap_major_weights ([O, 9C]) or conv3x3_flip_weights_tap_major ([C, 9O]),
// so that B's rows are contiguous in k: 16-byte copies where every row starts aligned
// (the row length a multiple of 4; the workspace itself is aligned).
class RearrangedWeights {
 public:
  using Kernel = void (*)(const float*, float*, int, int);
  RearrangedWeights(const char* name, Kernel kernel, const float* w, int C, int O,
                    cudaStream_t stream)
      : count_(int64_t{9} * O * C), workspace_(count_, stream, name) {
    if (count_ > 0)
      launch_kernel(name, kernel, dim3(grid_1d(count_)), dim3(kBlock1d), stream, w,
                    workspace_.data(), C, O);
  }
  const float* data() const { return workspace_.data(); }
  bool vec(int64_t row_length) const { return row_length % 4 == 0 && aligned16(workspace_.data()); }

 private:
  int64_t count_;
  Workspace workspace_;
};

RearrangedWeights flipped_weights(const float* w, int C, int O, cudaStream_t stream) {
  return {"conv3x3_flip_weights", conv3x3_flip_weights, w, C, O, stream};
}
RearrangedWeights tap_major_weights(const float* w, int C, int O, cudaStream_t stream) {
  return {"conv3x3_tap_major_weights", conv3x3_tap_major_weights, w, C, O, stream};
}
RearrangedWeights flipped_tap_major_weights(const float* w, int C, int O, cudaStream_t stream) {
  return {"conv3x3_flip_weights_tap_major", conv3x3_flip_weights_tap_major, w, C, O, stream};
}

// The tap-major views (Conv3x3ForwardTapGemm above) serve v4-v6 where the channels K runs over
// (C for the forward, both parts of a concatenation; O for the backward data) are a multiple of
// kTapMajorChannels: every K tile of every one of these versions (bk = 16 for v4 and v5, 32 for
// v6) is then one tap.
static_assert(kTapMajorChannels % kV4BK == 0 && kTapMajorChannels % kV5BK == 0 &&
                  kTapMajorChannels % kV6BK == 0,
              "every K tile lies within one tap");

// `plane`: the pixels of one channel of the tensor A reads. The tap-major views and the copier
// address within one image of it with ints (a few instructions per copy fewer than 64-bit
// offsets): its channels x plane elements must number fewer than 2^31.
bool tap_major(Conv3x3Version version, int channels, int64_t plane) {
  return (version == Conv3x3Version::kV4Tf32Mma || version == Conv3x3Version::kV5Bf16Mma ||
          version == Conv3x3Version::kV6Tf32Wgmma) &&
         channels > 0 && channels % kTapMajorChannels == 0 && plane <= INT32_MAX / channels;
}

Conv3x3BackwardWeightGemm backward_weight_gemm(const float* x, const float* dy, int N, int C,
                                               int H, int W, int O) {
  return {x,     dy, nullptr, C, H, W, O, H - 2, W - 2, O, 9 * C, static_cast<int64_t>(O) * 9 * C,
          N};
}

// The forward: v4's and v5's fast path copies B = w[o, k] 16 bytes at a time, when every row of
// w starts aligned.
template <class Gemm>  // Conv3x3ForwardGemm or Conv3x3ConcatForwardGemm
void run_forward_gemm(const std::string& op, const Gemm& g, Conv3x3Version version,
                      cudaStream_t stream) {
  run_output_gemm(op, g, version, g.K % 4 == 0 && aligned16(g.w), stream);
}

// dw through the GEMM view `g` (its `out` is set here): one split writes dw, several write
// partials into a workspace that conv3x3_split_k_reduce adds up in split order.
template <class Gemm>  // Conv3x3BackwardWeightGemm or Conv3x3ConcatBackwardWeightGemm
void run_backward_weight_gemm(const std::string& op, Gemm g, float* dw, int N,
                              Conv3x3Version version, cudaStream_t stream) {
  const std::string name = op + "_" + version_name(version);
  // k_pos numbers the pixels of one output plane and the K tiles (of kMinBK pixels or more) with
  // ints
  constexpr int64_t kMinBK = 8;
  static_assert(kV3BK >= kMinBK && kV4BK >= kMinBK && kV5BK >= kMinBK && kV6BK >= kMinBK &&
                    V6Wide::kBK >= kMinBK,
                "no GEMM version walks K in tiles of fewer pixels");
  const int64_t plane = static_cast<int64_t>(g.P) * g.Q;
  if (plane > INT32_MAX || N * ceil_div<int64_t>(plane, kMinBK) > INT32_MAX)
    throw std::runtime_error(name + ": " + std::to_string(N) + " output planes of " +
                             std::to_string(g.P) + " x " + std::to_string(g.Q) + " pixels " +
                             "exceed the GEMM versions' 32-bit pixel and K-tile indices; use " +
                             "v1_direct or v2_smem");
  // Fast path of v4-v6: A = dy[n, o, pixels] in 16-byte pieces, when every plane of dy is a
  // whole number of them (P*Q % 4 == 0: every even-sized U-Net layer) and dy is aligned. The plan:
  // plan_backward_weight's GEMM (plan_weight_gemm) by rule, or a measured one.
  const bool vec_a = plane % 4 == 0 && aligned16(g.dy);
  run_weight_gemm(op, version, g.O, g.cols, N, plane, dw, g.split_stride, stream,
                  [&](float* out, const GemmTile& tile, int splits) {
                    g.out = out;
                    launch_gemm(name, g, version, tile, splits, vec_a, false, stream);
                  });
}

// =================================================================================================
// v7, v8 and v9 (conv3x3_halo.cuh): the forward and backward data with the input window copied
// once per slice of channels for all nine taps, in TF32 (v7), bf16 (v8) or FP32 (v9); v9's weight
// gradient
// =================================================================================================

// A source that holds no channels (the second of a plain convolution): never read.
HaloSource no_halo_source(const float* p) { return {p, 0, 1, 1, 0, 0}; }

// `in` with a first source that holds channels: a concatenation without up channels reads skip
// alone, as its first source, so that the kernels' stand-in address for the copies that read
// nothing is a tensor that has elements (up's may be null).
HaloInput with_a_first_source(HaloInput in) {
  if (in.first.channels == 0) {
    in.first = in.second;
    in.second = no_halo_source(in.first.p);
  }
  return in;
}

// v6, v7 and v8 need a Hopper GPU and an sm_90a build (v6_available); the others run anywhere.
bool needs_sm90a(Conv3x3Version version) {
  return version == Conv3x3Version::kV6Tf32Wgmma || version == Conv3x3Version::kV7Tf32Halo ||
         version == Conv3x3Version::kV8Bf16Halo;
}

// v7, v8 and v9 take an op whose correlation sums at least 8 channels (the first layer's C = 1 would
// multiply 7 zeros for each channel: their GEMM version there) and whose sources each hold fewer
// than 2^31 elements per image (the window copies address them with ints); the GEMMs of
// gemm_version otherwise.
constexpr int kHaloMinChannels = 8;
bool halo_applies(const HaloSource& first, const HaloSource& second) {
  const auto fits = [](const HaloSource& t) {
    return int64_t{t.channels} * t.h * t.w <= INT32_MAX;
  };
  return first.channels + second.channels >= kHaloMinChannels && fits(first) && fits(second);
}

// The plan of v7, v8 or v9, from the shapes alone (the same on every GPU): 128 output channels a
// block (16 x 8 pixels), or 64 where the output has no more (16 x 16 pixels); the slices split
// over blockIdx.z by v4-v6's rule (output_splits).
struct HaloPlan {
  int bn;
  int splits;
};

// The patches of an out_h x out_w output in the tile of `bn` columns (the wide or the tall one).
struct HaloPatches {
  int x, per_image;
};
HaloPatches halo_patches(int bn, int out_h, int out_w) {
  const bool wide = bn == HaloWide<false>::kBN;
  const int pw = wide ? HaloWide<false>::kPW : HaloTall<false>::kPW;
  const int ph = wide ? HaloWide<false>::kPH : HaloTall<false>::kPH;
  const int x = ceil_div(out_w, pw);
  return {x, x * ceil_div(out_h, ph)};
}
static_assert(HaloWide<true>::kPW == HaloWide<false>::kPW && HaloTall<true>::kPH == HaloTall<false>::kPH &&
                  HaloWide<true>::kBN == HaloWide<false>::kBN && HaloTall<true>::kBN == HaloTall<false>::kBN,
              "v7 and v8 share their patches (v9 too: FfmaHaloWide, FfmaHaloTall)");

// The channels of a slice of v7 and v9 (8) or v8 (16), and the blocks an SM holds.
int halo_slice_channels(Conv3x3Version version) {
  return version == Conv3x3Version::kV8Bf16Halo ? HaloMath<true>::kSliceChannels
                                                : HaloMath<false>::kSliceChannels;
}
static_assert(FfmaHaloMath::kSliceChannels == HaloMath<false>::kSliceChannels, "v9 slices as v7");
int halo_blocks_per_sm(Conv3x3Version version) {
  return version == Conv3x3Version::kV9Fp32Halo ? kFfmaHaloBlocksPerSM : kHaloBlocksPerSM;
}

HaloPlan plan_halo(Conv3x3Version version, int64_t N, int out_h, int out_w, int out_channels,
                   int in_channels) {
  const int bn = out_channels > HaloTall<false>::kBN ? HaloWide<false>::kBN : HaloTall<false>::kBN;
  const int64_t tiles =
      N * halo_patches(bn, out_h, out_w).per_image * ceil_div(out_channels, bn);
  const int slice = halo_slice_channels(version);
  const int64_t K = int64_t{9} * slice * ceil_div(in_channels, slice);  // whole slices
  return {bn, output_splits(tiles, K, N * out_h * out_w * out_channels,
                            kSMs * halo_blocks_per_sm(version))};
}

template <class Gemm, class Tile>
void launch_halo(const char* name, const Gemm& g, const HaloInput& in, int64_t images,
                 const void* wt, int splits, cudaStream_t stream) {
  constexpr auto kernel = halo_kernel<Gemm, Tile>();
  allow_dynamic_smem<kernel>(Tile::kSmemBytes, name);
  const dim3 grid = checked_grid(name, images * in.patches, in.o_tiles, splits);
  launch_kernel_smem(name, kernel, grid, dim3(kHaloThreads), Tile::kSmemBytes, stream, g, in, wt);
}

// The op whose output view is `g` (M = N x out_h x out_w pixels, cols output channels), reading
// `in` (its sources set) with the weights w [O, C, 3, 3] (flip: the backward data's, whose
// outputs are the C channels), in v7, v8 or v9: the weights arranged for it
// (conv3x3_halo_weights), then the kernel, its K split as v4-v6 split theirs (with_output_split).
template <class Gemm>
void run_halo_conv(const std::string& op, const Gemm& g, HaloInput in, int64_t N, const float* w,
                   int C, int O, bool flip, Conv3x3Version version, cudaStream_t stream) {
  const bool bf16 = version == Conv3x3Version::kV8Bf16Halo;
  const bool ffma = version == Conv3x3Version::kV9Fp32Halo;
  const std::string name = op + "_" + version_name(version);
  if (needs_sm90a(version) && !v6_available(stream))
    throw std::runtime_error(name + ": " + version_name(version) + " needs a Hopper GPU (compute "
                             "capability 9.0) and a build for sm_90a (UNET_CUDA_ARCH=90a); use " +
                             (bf16 ? "v5_bf16_mma" : "v4_tf32_mma") + " elsewhere");
  in = with_a_first_source(in);
  const HaloPlan plan = plan_halo(version, N, in.out_h, in.out_w, g.cols, in.channels());
  const HaloPatches patches = halo_patches(plan.bn, in.out_h, in.out_w);
  const int slice = halo_slice_channels(version);
  in.patches_x = patches.x;
  in.patches = patches.per_image;
  in.slices = ceil_div(in.channels(), slice);
  in.o_tiles = ceil_div(g.cols, plan.bn);
  // the arranged weights: float32 for v7 and v9, bf16 for v8 (half the bytes: an even count)
  const int64_t pairs = int64_t{in.slices} * slice * in.o_tiles * plan.bn;  // (in, out) channels
  Workspace wt(bf16 ? pairs * 9 / 2 : pairs * 9, stream, "conv3x3 halo weights");
  const auto weights = bf16 ? conv3x3_halo_weights<HaloMath<true>>
                            : ffma ? conv3x3_halo_weights<FfmaHaloMath>
                                   : conv3x3_halo_weights<HaloMath<false>>;
  launch_kernel("conv3x3_halo_weights", weights, dim3(grid_1d(pairs)), dim3(kBlock1d), stream, w,
                static_cast<void*>(wt.data()), C, O, flip, plan.bn, in.o_tiles, in.slices);
  const bool wide = plan.bn == HaloWide<false>::kBN;
  with_output_split(op, g, plan.splits, stream, [&](const auto& view) {
    using View = std::decay_t<decltype(view)>;
    const void* arranged = wt.data();
    const int s = plan.splits;
    const char* kname = name.c_str();
    if (ffma) {
      if (wide) launch_halo<View, FfmaHaloWide>(kname, view, in, N, arranged, s, stream);
      else launch_halo<View, FfmaHaloTall>(kname, view, in, N, arranged, s, stream);
    } else if (bf16) {
      if (wide) launch_halo<View, HaloWide<true>>(kname, view, in, N, arranged, s, stream);
      else launch_halo<View, HaloTall<true>>(kname, view, in, N, arranged, s, stream);
    } else {
      if (wide) launch_halo<View, HaloWide<false>>(kname, view, in, N, arranged, s, stream);
      else launch_halo<View, HaloTall<false>>(kname, view, in, N, arranged, s, stream);
    }
  });
}

// v9's weight gradient (conv3x3_halo.cuh, ffma_weight_block): where its x holds 8 channels or more
// (halo_applies); v3's GEMM otherwise. The tile: 128 output channels by 16 input channels, or 64
// by 32 where the output has 64 or fewer; the patches of 4 x 16 output pixels of all images split
// over blockIdx.z by the GEMMs' rule (plan_splits: about two blocks per SM, at least 1024 pixels
// a split), their partials added in split order (with_split_partials).
struct FfmaWeightPlan {
  bool wide;
  int patches_x, patches;  // per row of patches, per image
  int64_t units;           // patches of all images
  int splits;
};

FfmaWeightPlan plan_ffma_weight(int64_t N, int P, int Q, int O, int C) {
  const bool wide = O > FfmaWeightTall::kBO;
  const int bo = wide ? FfmaWeightWide::kBO : FfmaWeightTall::kBO;
  const int bc = wide ? FfmaWeightWide::kBC : FfmaWeightTall::kBC;
  static_assert(FfmaWeightWide::kPR == FfmaWeightTall::kPR && FfmaWeightWide::kPL == FfmaWeightTall::kPL,
                "one patch for both tiles");
  const int px = ceil_div(Q, FfmaWeightWide::kPL);
  const int per_image = px * ceil_div(P, FfmaWeightWide::kPR);
  const int64_t units = N * per_image;
  const int64_t tiles = int64_t{ceil_div(O, bo)} * ceil_div(C, bc);
  const int splits = plan_splits(tiles, units, FfmaWeightWide::kPixels, int64_t{O} * C * 9,
                                 kSMs * kFfmaHaloBlocksPerSM);
  return {wide, px, per_image, units, splits};
}

template <class Tile>
void launch_ffma_weight(const char* name, const HaloInput& in, const FfmaWeightArgs& a, int splits,
                        cudaStream_t stream) {
  constexpr auto kernel = conv3x3_v9_fp32_halo_weight<Tile>;
  allow_dynamic_smem<kernel>(Tile::kSmemBytes, name);
  const dim3 grid = checked_grid(name, ceil_div(a.O, Tile::kBO), ceil_div(in.channels(), Tile::kBC),
                                 splits);
  launch_kernel_smem(name, kernel, grid, dim3(kHaloThreads), Tile::kSmemBytes, stream, in, a);
}

// dw [O, C, 3, 3] (C = in.channels()) of dy [N, O, in.out_h, in.out_w] and the input `in` reads.
void run_ffma_weight_gradient(const std::string& op, HaloInput in, const float* dy, float* dw,
                              int64_t N, int O, cudaStream_t stream) {
  in = with_a_first_source(in);
  const int C = in.channels();
  const FfmaWeightPlan plan = plan_ffma_weight(N, in.out_h, in.out_w, O, C);
  in.patches_x = plan.patches_x;
  in.patches = plan.patches;
  const std::string name = op + "_v9_fp32_halo";
  with_split_partials(dw, int64_t{O} * C * 9, plan.splits, stream, [&](float* out) {
    const FfmaWeightArgs a{dy, out, O, plan.units};
    if (plan.wide) launch_ffma_weight<FfmaWeightWide>(name.c_str(), in, a, plan.splits, stream);
    else launch_ffma_weight<FfmaWeightTall>(name.c_str(), in, a, plan.splits, stream);
  });
}

// Whether v9's own weight gradient takes a convolution whose input is `first` (and `second`).
bool ffma_weight_applies(Conv3x3Version version, const HaloSource& first, const HaloSource& second) {
  return version == Conv3x3Version::kV9Fp32Halo && halo_applies(first, second);
}

// The concatenated input's crop offset; the bindings check that Hs-H and Ws-W are even, >= 0.
void check_concat_version(const char* op, Conv3x3Version version) {
  if (!conv3x3_fuses_concat(version))
    throw std::runtime_error(std::string(op) + ": version " + version_name(version) +
                             " cannot read a concatenated input; use a GEMM version (v3-v6), or "
                             "crop_concat and conv3x3");
}

}  // namespace

#ifndef UNET_CPU_EMULATION  // the emulation has the instructions and never asks
namespace {

// Whether this build holds the sm_90a code of v6 for the current device: a kernel compiled with
// the wgmma instructions answers 1, any other build of it 0 (its body would trap).
__global__ void conv3x3_v6_probe(int* has_wgmma) {
#ifdef UNET_WGMMA
  *has_wgmma = 1;
#else
  *has_wgmma = 0;
#endif
}

}  // namespace
#endif

// v6 runs only where the device is a Hopper (compute capability 9.0) and this build holds the
// sm_90a code (UNET_CUDA_ARCH with 90a): asked once per device with conv3x3_v6_probe, at the
// first v6 launch of any op (an eager one: a CUDA graph is captured after an eager step), or by
// conv3x3_version_available. The launch's own stream is checked for a capture.
bool v6_available(cudaStream_t stream) {
#ifdef UNET_CPU_EMULATION
  return true;  // the emulation has the instructions
#else
  static std::atomic<int> known[kMaxDevices] = {};  // 0 unknown, 1 yes, 2 no
  int device = 0;
  CUDA_CHECK(cudaGetDevice(&device), "v6_tf32_wgmma");
  int state = device >= 0 && device < kMaxDevices ? known[device].load() : 0;
  if (state == 0) {
    int major = 0, minor = 0;
    CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device),
               "v6_tf32_wgmma");
    CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device),
               "v6_tf32_wgmma");
    int has = 0;
    if (major == 9 && minor == 0) {
      // The probe synchronises (cudaMalloc, cudaMemcpy): not allowed inside a stream capture.
      cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
      if (cudaStreamIsCapturing(stream, &capturing) != cudaSuccess ||
          capturing != cudaStreamCaptureStatusNone) {
        cudaGetLastError();
        throw std::runtime_error(
            "v6_tf32_wgmma: whether this GPU can run it is asked with a probe kernel at its first "
            "use, which cannot happen inside a CUDA graph capture; run one eager step first (or "
            "call conv3x3_version_available) before capturing");
      }
      cudaGetLastError();  // an earlier, unrelated error must not be taken for the probe's
      int* flag = nullptr;
      CUDA_CHECK(cudaMalloc(&flag, sizeof(int)), "v6_tf32_wgmma probe");
      conv3x3_v6_probe<<<1, 1>>>(flag);
      const cudaError_t launched = cudaGetLastError();
      const cudaError_t copied =
          launched == cudaSuccess ? cudaMemcpy(&has, flag, sizeof(int), cudaMemcpyDeviceToHost)
                                  : launched;
      cudaFree(flag);
      CUDA_CHECK(copied, "v6_tf32_wgmma probe");
    }
    state = has ? 1 : 2;
    if (device >= 0 && device < kMaxDevices) known[device].store(state);
  }
  return state == 1;
#endif
}

bool conv3x3_version_available(Conv3x3Version version) {
  return !needs_sm90a(version) || v6_available();
}

bool conv3x3_fuses_concat(Conv3x3Version version) {  // the GEMM versions, v7, v8 and v9
  return is_gemm_version(gemm_version(version));
}

// =================================================================================================
// The table of measured plans (launchers.h, "Plans measured instead of ruled"): one per module,
// read and written by the GEMMs of conv3x3.cu and upconv.cu (implicit_gemm.cuh, chosen_gemm_plan)
// =================================================================================================

namespace {

struct GemmPlanKeyLess {
  bool operator()(const GemmPlanKey& a, const GemmPlanKey& b) const {
    return std::tie(a.op, a.version, a.M, a.cols, a.K, a.images) <
           std::tie(b.op, b.version, b.M, b.cols, b.K, b.images);
  }
};

struct GemmPlanTable {
  std::mutex mutex;         // the entries'
  std::mutex tuning_mutex;  // held through one tuning (chosen_gemm_plan)
  std::map<GemmPlanKey, TunedGemmPlan, GemmPlanKeyLess> entries;
  // whether entries is empty, readable without the lock: every GEMM asks, and the table stays
  // empty unless plans are measured or set
  std::atomic<bool> empty{true};
  std::atomic<bool> autotune{false};
};

GemmPlanTable& gemm_plan_table() {
  static GemmPlanTable table;
  return table;
}

}  // namespace

bool find_tuned_gemm_plan(const GemmPlanKey& key, GemmPlan* plan) {
  GemmPlanTable& table = gemm_plan_table();
  if (table.empty.load()) return false;
  const std::lock_guard<std::mutex> lock(table.mutex);
  const auto found = table.entries.find(key);
  if (found == table.entries.end()) return false;
  ++found->second.uses;
  *plan = found->second.plan;
  return true;
}

void record_tuned_gemm_plan(const TunedGemmPlan& tuned, bool replace) {
  GemmPlanTable& table = gemm_plan_table();
  const std::lock_guard<std::mutex> lock(table.mutex);
  if (replace) table.entries.insert_or_assign(tuned.key, tuned);
  else table.entries.insert({tuned.key, tuned});
  table.empty.store(false);
}

std::mutex& gemm_tuning_mutex() { return gemm_plan_table().tuning_mutex; }

void set_gemm_autotune(bool enabled) { gemm_plan_table().autotune.store(enabled); }
bool gemm_autotune() { return gemm_plan_table().autotune.load(); }

GemmPlan gemm_plan_rule(const GemmPlanKey& key) { return gemm_plans(key).front(); }
std::vector<GemmPlan> gemm_plan_candidates(const GemmPlanKey& key) { return gemm_plans(key); }

std::vector<TunedGemmPlan> tuned_gemm_plans() {
  GemmPlanTable& table = gemm_plan_table();
  const std::lock_guard<std::mutex> lock(table.mutex);
  std::vector<TunedGemmPlan> plans;
  for (const auto& entry : table.entries) plans.push_back(entry.second);
  return plans;
}

void set_tuned_gemm_plan(const GemmPlanKey& key, const GemmPlan& plan) {
  const std::vector<GemmPlan> plans = gemm_plans(key);  // checks the key
  bool offered = false;
  std::string names;
  for (const GemmPlan& p : plans) {
    offered = offered || same_plan(p, plan);
    names += (names.empty() ? "" : ", ") + std::to_string(p.bm) + "x" + std::to_string(p.bn) +
             "/" + std::to_string(p.splits);
  }
  if (!offered)
    throw std::invalid_argument(
        "GEMM plan of " + key.op + " (" + version_name(key.version) + ", M " +
        std::to_string(key.M) + ", cols " + std::to_string(key.cols) + ", K " +
        std::to_string(key.K) + ", images " + std::to_string(key.images) + "): tile " +
        std::to_string(plan.bm) + " x " + std::to_string(plan.bn) + " in " +
        std::to_string(plan.splits) + " slices is not one of its plans (tile/slices): " + names);
  const double unmeasured = std::numeric_limits<double>::quiet_NaN();
  record_tuned_gemm_plan({key, plan, plans.front(), unmeasured, unmeasured, 0, 0, {}}, true);
}

void clear_tuned_gemm_plans() {
  GemmPlanTable& table = gemm_plan_table();
  const std::lock_guard<std::mutex> lock(table.mutex);
  table.entries.clear();
  table.empty.store(true);
}

int conv3x3_backward_weight_splits(Conv3x3Version version, int N, int C, int H, int W, int O) {
  if (ffma_weight_applies(version, {nullptr, C, H, W, 0, 0}, no_halo_source(nullptr)))
    return plan_ffma_weight(N, H - 2, W - 2, O, C).splits;
  return plan_backward_weight(gemm_version(version), N, C, H, W, O).splits;
}

int conv3x3_backward_weight_tile_columns(Conv3x3Version version, int N, int C, int H, int W, int O) {
  if (ffma_weight_applies(version, {nullptr, C, H, W, 0, 0}, no_halo_source(nullptr)))
    return 0;  // v9's own kernel: no GEMM
  return plan_backward_weight(gemm_version(version), N, C, H, W, O).tile.bn;
}

bool conv3x3_tap_major(Conv3x3Version version, int channels) {
  return !is_halo_version(version) && tap_major(version, channels, 0);
}

int conv3x3_forward_splits(Conv3x3Version version, int N, int C, int H, int W, int O) {
  if (!conv3x3_fuses_concat(version)) return 1;  // v1, v2: no split
  if (is_halo_version(version) && halo_applies({nullptr, C, H, W, 0, 0}, no_halo_source(nullptr)))
    return plan_halo(version, N, H - 2, W - 2, O, C).splits;
  return plan_output(gemm_version(version), static_cast<int64_t>(N) * (H - 2) * (W - 2), O,
                     int64_t{9} * C).splits;
}

int conv3x3_backward_data_splits(Conv3x3Version version, int N, int C, int H, int W, int O) {
  if (!conv3x3_fuses_concat(version)) return 1;
  if (is_halo_version(version) &&
      halo_applies({nullptr, O, H - 2, W - 2, -2, -2}, no_halo_source(nullptr)))
    return plan_halo(version, N, H, W, C, O).splits;
  return plan_output(gemm_version(version), static_cast<int64_t>(N) * H * W, C, int64_t{9} * O)
      .splits;
}

void launch_conv3x3_forward(const float* x, const float* w, const float* b, float* y, int N, int C,
                            int H, int W, int O, bool relu, Conv3x3Version version,
                            cudaStream_t stream) {
  const int P = H - 2, Q = W - 2;
  const int64_t total = static_cast<int64_t>(N) * O * P * Q;
  if (total == 0) return;
  switch (version) {
    case Conv3x3Version::kV1Direct:
      launch_kernel("conv3x3_forward_v1_direct", conv3x3_forward_v1_direct, dim3(grid_1d(total)),
                    dim3(kBlock1d), stream, x, w, b, y, N, C, H, W, O, relu);
      return;
    case Conv3x3Version::kV2Smem: {
      const int64_t tiles = int64_t{N} * ceil_div(P, kV2Tile) * ceil_div(Q, kV2Tile);
      const char* name = "conv3x3_forward_v2_smem";
      launch_kernel(name, conv3x3_forward_v2_smem,
                    checked_grid(name, tiles, ceil_div(O, kV2Group), 1), dim3(kV2Threads), stream,
                    x, w, b, y, N, C, H, W, O, relu);
      return;
    }
    default:
      if (is_halo_version(version)) {
        const HaloSource source{x, C, H, W, 0, 0};
        if (halo_applies(source, no_halo_source(x))) {
          run_halo_conv("conv3x3_forward", forward_gemm(x, w, b, y, N, C, H, W, O, relu),
                        {source, no_halo_source(x), P, Q}, N, w, C, O, false,
                        version, stream);
          return;
        }
        version = gemm_version(version);
      }
      if (tap_major(version, C, int64_t{H} * W)) {
        const RearrangedWeights wt = tap_major_weights(w, C, O, stream);
        const Conv3x3ForwardTapGemm g{forward_gemm(x, wt.data(), b, y, N, C, H, W, O, relu)};
        run_output_gemm("conv3x3_forward", g, version, wt.vec(9 * C), stream);
        return;
      }
      run_forward_gemm("conv3x3_forward", forward_gemm(x, w, b, y, N, C, H, W, O, relu), version,
                       stream);
  }
}

void launch_conv3x3_backward_data(const float* dy, const float* w, const float* relu_mask,
                                  float* dx, int N, int C, int H, int W, int O,
                                  Conv3x3Version version, cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(N) * C * H * W;
  if (total == 0) return;
  switch (version) {
    case Conv3x3Version::kV1Direct:
      launch_kernel("conv3x3_backward_data_v1_direct", conv3x3_backward_data_v1_direct,
                    dim3(grid_1d(total)), dim3(kBlock1d), stream, dy, w, relu_mask, dx, N, C, H,
                    W, O);
      return;
    case Conv3x3Version::kV2Smem: {
      const int64_t tiles = int64_t{N} * ceil_div(H, kV2Tile) * ceil_div(W, kV2Tile);
      const char* name = "conv3x3_backward_data_v2_smem";
      launch_kernel(name, conv3x3_backward_data_v2_smem,
                    checked_grid(name, tiles, ceil_div(C, kV2Group), 1), dim3(kV2Threads), stream,
                    dy, w, relu_mask, dx, N, C, H, W, O);
      return;
    }
    default: {
      if (is_halo_version(version)) {
        const HaloSource source{dy, O, H - 2, W - 2, -2, -2};
        if (halo_applies(source, no_halo_source(dy))) {
          run_halo_conv("conv3x3_backward_data",
                        backward_data_gemm(dy, nullptr, dx, relu_mask, N, C, H, W, O),
                        {source, no_halo_source(dy), H, W}, N, w, C, O, true,
                        version, stream);
          return;
        }
        version = gemm_version(version);
      }
      if (tap_major(version, O, int64_t{H - 2} * (W - 2))) {
        const RearrangedWeights wf = flipped_tap_major_weights(w, C, O, stream);
        const TapMajorBackwardData<Conv3x3BackwardDataGemm> g{
            backward_data_gemm(dy, wf.data(), dx, relu_mask, N, C, H, W, O)};
        run_output_gemm("conv3x3_backward_data", g, version, wf.vec(9 * O), stream);
        return;
      }
      const RearrangedWeights wf = flipped_weights(w, C, O, stream);
      run_output_gemm("conv3x3_backward_data",
                      backward_data_gemm(dy, wf.data(), dx, relu_mask, N, C, H, W, O), version,
                      wf.vec(9 * O), stream);
    }
  }
}

void launch_conv3x3_backward_weight(const float* x, const float* dy, float* dw, float* db, int N,
                                    int C, int H, int W, int O, Conv3x3Version version,
                                    cudaStream_t stream) {
  const HaloSource source{x, C, H, W, 0, 0};
  const bool own_kernel = ffma_weight_applies(version, source, no_halo_source(x));  // v9's
  version = gemm_version(version);  // v7, v8, v9: their GEMM version's (v6, v5, v3)
  const int64_t count = static_cast<int64_t>(O) * C * 9;  // elements of dw
  if (count > 0) {
    if (own_kernel) {
      run_ffma_weight_gradient("conv3x3_backward_weight", {source, no_halo_source(x), H - 2, W - 2},
                               dy, dw, N, O, stream);
    } else if (version == Conv3x3Version::kV1Direct) {
      const int64_t blocks = static_cast<int64_t>(O) * C;
      if (blocks > INT32_MAX)
        throw std::runtime_error("conv3x3_backward_weight: O*C = " + std::to_string(blocks) +
                                 " exceeds the grid limit");
      launch_kernel("conv3x3_backward_weight_v1_block_per_oc",
                    conv3x3_backward_weight_v1_block_per_oc, dim3(static_cast<unsigned>(blocks)),
                    dim3(kReduceBlock), stream, x, dy, dw, N, C, H, W, O);
    } else if (version == Conv3x3Version::kV2Smem) {
      const int splits = plan_backward_weight(version, N, C, H, W, O).splits;
      with_split_partials(dw, count, splits, stream, [&](float* out) {
        const char* name = "conv3x3_backward_weight_v2_smem";
        const int64_t tiles = ceil_div<int64_t>(O, kV2WOuts) * ceil_div<int64_t>(C, kV2WIns);
        launch_kernel(name, conv3x3_backward_weight_v2_smem, checked_grid(name, tiles, splits, 1),
                      dim3(kV2WThreads), stream, x, dy, out, N, C, H, W, O);
      });
    } else if (few_input_channels(version, C)) {
      const int splits = few_channels_splits(N, H, W, O);
      with_split_partials(dw, count, splits, stream, [&](float* out) {
        const char* name = "conv3x3_backward_weight_few_channels";
        launch_kernel(name, conv3x3_backward_weight_few_channels, checked_grid(name, O, splits, 1),
                      dim3(kFewChannelsBlock), stream, x, dy, out, N, C, H, W, O);
      });
    } else {
      run_backward_weight_gemm("conv3x3_backward_weight",
                               backward_weight_gemm(x, dy, N, C, H, W, O), dw, N, version, stream);
    }
  }
  launch_bias_backward(dy, db, N, O, static_cast<int64_t>(H - 2) * (W - 2), stream);
}

// =================================================================================================
// The convolution of a concatenated input [up, centre crop of skip] (the Conv3x3Concat* views)
// =================================================================================================

// dskip outside the crop window is 0 (inside, the backward-data GEMM writes it).
__global__ void conv3x3_concat_zero_skip_border(float* __restrict__ dskip, int64_t planes, int H,
                                                int W, int Hs, int Ws) {
  const int oy = (Hs - H) / 2, ox = (Ws - W) / 2;
  const int64_t total = planes * Hs * Ws;
  for (int64_t e = global_thread(); e < total; e += grid_stride()) {
    const int xx = static_cast<int>(e % Ws), yy = static_cast<int>((e / Ws) % Hs);
    if (yy < oy || yy >= oy + H || xx < ox || xx >= ox + W) dskip[e] = 0.0f;
  }
}

void launch_conv3x3_concat_forward(const float* up, const float* skip, const float* w,
                                   const float* b, float* y, int N, int Cu, int Cs, int H, int W,
                                   int Hs, int Ws, int O, bool relu, Conv3x3Version version,
                                   cudaStream_t stream) {
  check_concat_version("conv3x3_concat_forward", version);
  if (static_cast<int64_t>(N) * O * (H - 2) * (W - 2) == 0) return;
  if (is_halo_version(version)) {
    const HaloSource first{up, Cu, H, W, 0, 0}, second{skip, Cs, Hs, Ws, (Hs - H) / 2, (Ws - W) / 2};
    if (halo_applies(first, second)) {
      const Conv3x3ConcatForwardGemm g{forward_gemm(up, w, b, y, N, Cu + Cs, H, W, O, relu), skip,
                                       Cu, Hs, Ws, (Hs - H) / 2, (Ws - W) / 2};
      run_halo_conv("conv3x3_concat_forward", g, {first, second, H - 2, W - 2}, N, w, Cu + Cs, O,
                    false, version, stream);
      return;
    }
    version = gemm_version(version);
  }
  if (tap_major(version, Cu, int64_t{H} * W) && tap_major(version, Cs, int64_t{Hs} * Ws)) {
    const RearrangedWeights wt = tap_major_weights(w, Cu + Cs, O, stream);
    const Conv3x3ConcatForwardTapGemm g{
        {forward_gemm(up, wt.data(), b, y, N, Cu + Cs, H, W, O, relu), skip, Cu, Hs, Ws,
         (Hs - H) / 2, (Ws - W) / 2}};
    run_output_gemm("conv3x3_concat_forward", g, version, wt.vec(9 * (Cu + Cs)), stream);
    return;
  }
  const Conv3x3ConcatForwardGemm g{forward_gemm(up, w, b, y, N, Cu + Cs, H, W, O, relu), skip, Cu,
                                   Hs, Ws, (Hs - H) / 2, (Ws - W) / 2};
  run_forward_gemm("conv3x3_concat_forward", g, version, stream);
}

void launch_conv3x3_concat_backward_data(const float* dy, const float* w, const float* up_mask,
                                         const float* skip_mask, float* dup, float* dskip, int N,
                                         int Cu, int Cs, int H, int W, int Hs, int Ws, int O,
                                         Conv3x3Version version, cudaStream_t stream) {
  check_concat_version("conv3x3_concat_backward_data", version);
  const int64_t skip_total = static_cast<int64_t>(N) * Cs * Hs * Ws;
  if (skip_total > 0 && (Hs != H || Ws != W))
    launch_kernel("conv3x3_concat_zero_skip_border", conv3x3_concat_zero_skip_border,
                  dim3(grid_1d(skip_total)), dim3(kBlock1d), stream, dskip,
                  static_cast<int64_t>(N) * Cs, H, W, Hs, Ws);
  if (static_cast<int64_t>(N) * (Cu + Cs) * H * W == 0) return;
  if (is_halo_version(version)) {
    const HaloSource source{dy, O, H - 2, W - 2, -2, -2};
    if (halo_applies(source, no_halo_source(dy))) {
      const Conv3x3ConcatBackwardDataGemm g{
          backward_data_gemm(dy, nullptr, dup, up_mask, N, Cu + Cs, H, W, O), dskip, Cu, Hs, Ws,
          (Hs - H) / 2, (Ws - W) / 2, skip_mask};
      run_halo_conv("conv3x3_concat_backward_data", g, {source, no_halo_source(dy), H, W}, N, w,
                    Cu + Cs, O, true, version, stream);
      return;
    }
    version = gemm_version(version);
  }
  if (tap_major(version, O, int64_t{H - 2} * (W - 2))) {
    const RearrangedWeights wf = flipped_tap_major_weights(w, Cu + Cs, O, stream);
    const TapMajorBackwardData<Conv3x3ConcatBackwardDataGemm> g{
        {backward_data_gemm(dy, wf.data(), dup, up_mask, N, Cu + Cs, H, W, O), dskip, Cu, Hs, Ws,
         (Hs - H) / 2, (Ws - W) / 2, skip_mask}};
    run_output_gemm("conv3x3_concat_backward_data", g, version, wf.vec(9 * O), stream);
    return;
  }
  const RearrangedWeights wf = flipped_weights(w, Cu + Cs, O, stream);
  const Conv3x3ConcatBackwardDataGemm g{
      backward_data_gemm(dy, wf.data(), dup, up_mask, N, Cu + Cs, H, W, O), dskip, Cu, Hs, Ws,
      (Hs - H) / 2, (Ws - W) / 2, skip_mask};
  run_output_gemm("conv3x3_concat_backward_data", g, version, wf.vec(9 * O), stream);
}

void launch_conv3x3_concat_backward_weight(const float* up, const float* skip, const float* dy,
                                           float* dw, float* db, int N, int Cu, int Cs, int H,
                                           int W, int Hs, int Ws, int O, Conv3x3Version version,
                                           cudaStream_t stream) {
  check_concat_version("conv3x3_concat_backward_weight", version);
  const HaloSource first{up, Cu, H, W, 0, 0}, second{skip, Cs, Hs, Ws, (Hs - H) / 2, (Ws - W) / 2};
  if (static_cast<int64_t>(O) * (Cu + Cs) > 0) {
    if (ffma_weight_applies(version, first, second)) {  // v9's own kernel
      run_ffma_weight_gradient("conv3x3_concat_backward_weight", {first, second, H - 2, W - 2}, dy,
                               dw, N, O, stream);
    } else {
      const Conv3x3ConcatBackwardWeightGemm g{backward_weight_gemm(up, dy, N, Cu + Cs, H, W, O),
                                              skip, Cu, Hs, Ws, (Hs - H) / 2, (Ws - W) / 2};
      // v7, v8, v9: their GEMM version's (v6, v5, v3)
      run_backward_weight_gemm("conv3x3_concat_backward_weight", g, dw, N, gemm_version(version),
                               stream);
    }
  }
  launch_bias_backward(dy, db, N, O, static_cast<int64_t>(H - 2) * (W - 2), stream);
}

}  // namespace unet
