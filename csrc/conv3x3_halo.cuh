// conv3x3_halo.cuh: v7_tf32_halo, the forward and the backward data of the 3x3 convolution on
// Hopper's warpgroup MMA (sm_90a), with the input copied once for all nine taps; v8_bf16_halo, the
// same in bf16; and v9_fp32_halo, the same window on the CUDA cores (FP32 FFMA, any GPU), with a
// weight gradient of its own. Included by conv3x3.cu, after implicit_gemm.cuh (whose wgmma,
// cp.async and split-K pieces it uses).
//
// What v7 changes over v6, and why. v4-v6 build the im2col matrix A in shared memory one K tile
// at a time: for each tap (ky, kx) and channel, the block's 128 pixels, each a 4-byte cp.async.
// An input element is read by nine taps, so it is copied up to nine times, and at 32 FLOPs per
// byte copied the copies, not the tensor cores, set v6's pace (ncu: warps waiting on cp.async).
//
// v7 lays a block's input window in shared memory so that every tap's A is the same memory seen
// from another start address. A block computes an output patch of PH x PW pixels (its rows of the
// GEMM) for BN output channels (its columns). For each slice of 8 input channels it copies the
// window the patch reads, (PH + 2) x (PW + 2) pixels, once, as
//     window[g][p][c % 4]   g = c / 4 (two groups of 4 channels), p = r * WP + s (WP = PW + 2),
// 16 bytes per pixel and group. An m64 wgmma product of v7 covers an 8 x 8 "unit" of the patch:
// its 64 rows are the unit's 8 output rows of 8 pixels, and in the canonical K-major layout (PTX
// ISA, "Shared Memory Matrix Layout") a core matrix is 8 rows of 16 bytes: here 8 consecutive
// pixels of one window row, 4 channels each. So the A operand of tap (ky, kx) for the unit at
// (uy, ux) is the descriptor
//     start  window + ((8 uy + ky) * WP + 8 ux + kx) * 16 bytes
//     SBO    WP * 16 bytes (the next core matrix: the next output row)
//     LBO    WP * (PH + 2) * 16 bytes (the next 4 channels: k 4..7 of the k8 product)
// and the nine taps are nine descriptors over one copy. Per slice a block copies the window
// (1,440 floats for a 16 x 8 patch) and the 9 x 8 x BN weights of the slice (prearranged in
// global memory in the canonical layout, so their copy is a straight run of 16-byte pieces), and
// issues 9 products of k8 per unit: 72 of K per stage, where v6 copies 128 x 32 floats of A for
// 32 of K. Per FLOP, a sixth of v6's bytes and copy instructions for A; with B (now most of what a
// stage copies), 0.6x v6's bytes.
//
// The tiles (HaloTile): a 16 x 8 patch (two units side by side, one per warpgroup) by 128 output
// channels, or a 16 x 16 patch (two units per warpgroup) by 64 where the output has at most 64. Four stages of one 8-channel slice
// each (42 KB a stage for 128 columns), K split over the slices (SplitPartialGemm) where the output
// tiles are too few to fill the GPU, as for v4-v6.
//
// Which ops: the plain and the concatenated convolutions' forward (input x, or up and the crop
// of skip) and backward data (input dy, read with a 2-pixel zero border: the full correlation with
// the flipped kernel). The output goes through the GEMM views' own epilogues (conv3x3.cu: bias and
// ReLU; the ReLU mask of the data gradients; the two outputs of the concatenation): a block's
// output pixel (n, i, j) is the view's row m = (n * P + i) * Q + j. The weight gradients and the
// up-convolutions run v6 (their K is the pixels; nothing there is copied nine times).
#pragma once

#include <cstdint>

#include "common.cuh"
#include "implicit_gemm.cuh"

namespace unet {

// One tensor the input channels come from: [N, channels, h, w]. Output pixel (i, j) reads its
// window from pixel (i + oy + r, j + ox + s), r, s in 0..2 (oy = ox = -2 for the backward data's
// border; the crop offset for the skip tensor); pixels outside the tensor read zero.
struct HaloSource {
  const float* p;
  int channels, h, w, oy, ox;
};

// The input of a v7 convolution: channels [0, first.channels) from `first`, the rest from
// `second` (a concatenation; second.channels 0 otherwise), over outputs of out_h x out_w pixels.
struct HaloInput {
  HaloSource first, second;
  int out_h, out_w;
  int patches_x, patches;  // patches per output row of patches, and per image
  int slices;              // ceil(channels / the slice's channels: 8 in v7 and v9, 16 in v8)
  int o_tiles;             // ceil(output channels / BN)
  __host__ __device__ int channels() const { return first.channels + second.channels; }
};

constexpr int kHaloStages = 4;
constexpr int kHaloThreads = 256;  // two warpgroups

// What each precision's products take: v7's TF32 wgmma is k8 (one slice of 8 channels per tap), v8's
// bf16 wgmma k16 (16 channels). An operand's 16-byte core-matrix row holds T of its elements, 4
// floats or 8 bf16; its canonical layout (PTX ISA) puts a product's two T-halves of k LBO = 8 T
// elements apart and its 8-row groups SBO = 16 T elements apart: 128 and 256 bytes in both.
template <bool BF16>
struct HaloMath {
  static constexpr bool kBF16 = BF16;
  static constexpr bool kRowsFast = false;  // conv3x3_halo_weights: the fast index is w's
  static constexpr int kSliceChannels = BF16 ? 16 : 8;
  static constexpr int kSliceK = 9 * kSliceChannels;  // K of a stage
  static constexpr int kT = BF16 ? 8 : 4;             // elements per 16 bytes
  static constexpr int kOperandBytes = 16 / kT;
  static constexpr uint32_t kLeadingBytes = 128, kStrideBytes = 256;
  // element (row, k) of a stage's B (rows x kSliceK, the k of tap t at kSliceChannels t ..)
  __host__ __device__ static constexpr int b_at(int bn, int row, int k) {
    return (k / (2 * kT)) * bn * 2 * kT + (row / 8) * 16 * kT + ((k % (2 * kT)) / kT) * 8 * kT +
           (row % 8) * kT + k % kT;
  }
};
static_assert(HaloMath<false>::b_at(128, 9, 13) == V6Smem<128, 72>::at(9, 13),
              "v7's B is v6's canonical layout");

// A block tile of v7 (BF16 false) or v8 (true): a patch of UW x UH units of 8 x 8 output pixels
// by BN output channels. The two warpgroups share the units (unit u = kUnitsPerGroup * warpgroup +
// i, at (u / UW, u % UW)), each with all BN columns: one m64nBN product per unit and tap, BN / 2
// accumulators per unit and thread.
// A stage holds a slice's window in float32, window[g][p][c % 4] (g = c / 4), then its B; v8 adds
// two bf16 windows, window16[g][p][c % 8] (g = c / 8), which a stage's float32 window is converted
// into for its products (one being read by the products in flight while the next is written).
template <int UW, int UH, int BN_, bool BF16>
struct HaloTile {
  using Math = HaloMath<BF16>;
  static constexpr bool kBF16 = BF16;
  static constexpr bool kFfma = false;
  static constexpr int kBN = BN_;
  static constexpr int kUnitsW = UW, kUnits = UW * UH, kUnitsPerGroup = kUnits / 2;
  static_assert(kUnits % 2 == 0, "the units split over the two warpgroups");
  static constexpr int kPW = 8 * UW, kPH = 8 * UH;           // the output patch
  static constexpr int kWP = kPW + 2, kHP = kPH + 2;         // its input window
  static constexpr int kWindowPixels = kWP * kHP;
  static constexpr int kWindowFloats = Math::kSliceChannels * kWindowPixels;
  static constexpr int kBBytes = BN_ * Math::kSliceK * Math::kOperandBytes;
  static constexpr int kStageBytes = 4 * kWindowFloats + kBBytes;
  static constexpr int kWindow16Bytes = BF16 ? 2 * kWindowFloats : 0;  // one bf16 window
  static_assert(kWindowFloats % 4 == 0 && kBBytes % 16 == 0, "every part starts 16-byte aligned");
  static constexpr size_t kSmemBytes = size_t{kHaloStages} * kStageBytes + 2 * kWindow16Bytes;
  static constexpr int kACopies = ceil_div(kWindowFloats, kHaloThreads);  // per thread, 4 bytes
  static constexpr int kConverts = ceil_div(kWindowFloats / 4, kHaloThreads);  // v8: 4 channels each
  static_assert(kSmemBytes <= 227 * 1024, "a block fits an SM");
};
// Every tile holds one block per SM: the 16 x 16 one of v7 (115 KB of shared memory) would leave
// room for a second, but not its registers (ptxas for sm_90a: 160-164 per thread for v7's 16 x 8
// tile, 176 for its 16 x 16 one, 196-250 for v8's; two blocks of 256 threads need 128 or fewer),
// and v8's tiles take 173-200 KB. The split
// planner counts its waves with this.
constexpr int kHaloBlocksPerSM = 1;
// 16 x 8 pixels by 128 channels: 64 accumulators per thread; v7 170 KB, v8 200 KB.
template <bool BF16>
using HaloWide = HaloTile<2, 1, 128, BF16>;
// 16 x 16 pixels by 64 channels, for the outputs of 64 channels or fewer (the 64-channel layers,
// where each block reads all of B, the layer's weights, for its pixels): two units per warpgroup,
// so that a stage's B serves 256 pixels, as v6's tall 256 x 64 tile does (measured 0.68-0.79x the
// 128-row tile's time there). 64 accumulators per thread; v7 115 KB, v8 173 KB.
template <bool BF16>
using HaloTall = HaloTile<2, 2, 64, BF16>;

// The slice weights of output-channel tile `tile`, as a stage holds them: B of tap t is rows
// (output channels) x the slice's channels, k = kSliceChannels t + channel, in the canonical layout
// (HaloMath::b_at; v7's is v6's V6Smem<BN, 72>; v9's FfmaHaloMath::b_at, rows contiguous):
// wt[(slice * o_tiles + tile) * BN * kSliceK + b_at(BN, row, k)], float32 for v7 and v9, bf16
// (rounded to nearest even, as v5 rounds) for v8. Zero past either channel count. Forward:
// w[o, c, tap] for output o and input c. flip (the backward data): the outputs are dx's channels
// c and the inputs dy's o, and tap t takes w[o, c, 8 - t]. One thread per (output channel, input
// channel) of the padded ranges, its nine taps (contiguous in w). `Math` gives the layout (b_at),
// the element type (kBF16) and which index consecutive threads take (kRowsFast).
template <class Math>
__global__ void conv3x3_halo_weights(const float* __restrict__ w, void* __restrict__ wt, int C,
                                     int O, bool flip, int bn, int o_tiles, int slices) {
  const int out_channels = flip ? C : O, in_channels = flip ? O : C;
  const int out_padded = o_tiles * bn, in_padded = slices * Math::kSliceChannels;
  const int64_t total = static_cast<int64_t>(out_padded) * in_padded;
  // the fast index: the one along which w's (o, c) pairs are contiguous (the output channel of the
  // backward data, the input channel forward), so that the reads coalesce; or, for v9's layout,
  // whose rows (output channels) are contiguous, always the output channel, so that the writes
  // do (each thread's nine reads are 36 contiguous bytes)
  const bool rows_fast = flip || Math::kRowsFast;
  for (int64_t e = global_thread(); e < total; e += grid_stride()) {
    const int64_t major = rows_fast ? e / out_padded : e / in_padded;
    const int minor = static_cast<int>(e - major * (rows_fast ? out_padded : in_padded));
    const int oc = rows_fast ? minor : static_cast<int>(major);
    const int ic = rows_fast ? static_cast<int>(major) : minor;
    const int slice = ic / Math::kSliceChannels, cl = ic - slice * Math::kSliceChannels;
    const int tile = oc / bn, row = oc - tile * bn;
    const int64_t block = (static_cast<int64_t>(slice) * o_tiles + tile) * bn * Math::kSliceK;
    const bool inside = oc < out_channels && ic < in_channels;
    const float* const src = w + (flip ? static_cast<int64_t>(ic) * C + oc
                                       : static_cast<int64_t>(oc) * C + ic) * 9;
#pragma unroll
    for (int tap = 0; tap < 9; ++tap) {
      const int64_t at = block + Math::b_at(bn, row, Math::kSliceChannels * tap + cl);
      const float v = inside ? src[flip ? 8 - tap : tap] : 0.0f;
      if constexpr (Math::kBF16)
        static_cast<uint16_t*>(wt)[at] = static_cast<uint16_t>(pack_bf16x2(v, 0.0f) & 0xFFFFu);
      else
        static_cast<float*>(wt)[at] = v;
    }
  }
}

// Thread tid's share of a straight copy of `kPieces` 16-byte pieces (a stage's prearranged
// weights): piece tid, tid + 256, ..; commits nothing.
template <int kPieces>
__device__ __forceinline__ void copy_pieces_16(float* dst, const float* src, int tid) {
#pragma unroll
  for (int r = 0; r < ceil_div(kPieces, kHaloThreads); ++r) {
    const int piece = tid + kHaloThreads * r;
    if (kPieces % kHaloThreads != 0 && piece >= kPieces) break;
    cp_async_16(dst + 4 * piece, src + 4 * piece);
  }
}

// Where one of a thread's window copies reads within an image, decided once per block: its
// channel within the slice, and its pixel's offset in each source's channel plane (-1: outside
// that tensor, zero).
struct HaloCopy {
  int channel;
  int first_offset, second_offset;
};

__device__ __forceinline__ int halo_pixel_offset(const HaloSource& t, int i, int j) {
  const int y = i + t.oy, x = j + t.ox;
  return y >= 0 && y < t.h && x >= 0 && x < t.w ? y * t.w + x : -1;
}

// The two sources of one image, and where a window element reads: channel c of the op's input
// (first's channels, then second's) at pixel offsets first_offset / second_offset within each
// source's plane (halo_pixel_offset; -1 outside it). `valid` false: nothing is read (outside the
// sources, or past their channels) and the address returned is a stand-in that is never read.
struct HaloImages {
  const float* first_image;
  const float* second_image;
  int first_plane, second_plane, first_channels, channels;

  __device__ HaloImages(const HaloInput& in, int64_t n) {
    const HaloSource& first = in.first;
    const HaloSource& second = in.second;
    first_image = first.p + n * first.channels * first.h * first.w;
    second_image = second.p + n * second.channels * second.h * second.w;
    first_plane = first.h * first.w;
    second_plane = second.h * second.w;
    first_channels = first.channels;
    channels = in.channels();
  }

  __device__ const float* source(int c, int first_offset, int second_offset, bool& valid) const {
    valid = false;
    if (c < first_channels) {
      valid = first_offset >= 0;
      return first_image + c * first_plane + (valid ? first_offset : 0);
    }
    if (c < channels) {
      valid = second_offset >= 0;
      return second_image + (c - first_channels) * second_plane + (valid ? second_offset : 0);
    }
    return first_image;
  }
};

// The copies of a thread into the float32 window of a slice: window[g][p][c % 4], float e = (g *
// pixels + p) * 4 + c % 4 taken by thread e % 256 (a warp's copies write 128 consecutive bytes).
// The sources are decided once per block (HaloCopy), the slice's channels per issue.
template <class Tile>
struct HaloWindowCopies {
  HaloCopy copies[Tile::kACopies];
  HaloImages images;

  __device__ HaloWindowCopies(const HaloInput& in, int64_t n, int i0, int j0, int tid)
      : images(in, n) {
#pragma unroll
    for (int r = 0; r < Tile::kACopies; ++r) {
      const int e = tid + kHaloThreads * r;
      const int group = e / (4 * Tile::kWindowPixels);
      const int p = (e - group * 4 * Tile::kWindowPixels) / 4;
      const int wy = p / Tile::kWP, wx = p - wy * Tile::kWP;
      copies[r].channel = 4 * group + e % 4;  // past the window: never issued
      copies[r].first_offset = halo_pixel_offset(in.first, i0 + wy, j0 + wx);
      copies[r].second_offset =
          in.second.channels > 0 ? halo_pixel_offset(in.second, i0 + wy, j0 + wx) : -1;
    }
  }

  // This thread's copies of the slice of channels c0 .. into `window` (zeros outside the sources
  // and past their channels); commits nothing.
  __device__ void issue(float* window, int c0, int tid) const {
#pragma unroll
    for (int r = 0; r < Tile::kACopies; ++r) {
      const int e = tid + kHaloThreads * r;
      if (Tile::kWindowFloats % kHaloThreads != 0 && e >= Tile::kWindowFloats) break;
      bool valid;
      const float* src = images.source(c0 + copies[r].channel, copies[r].first_offset,
                                       copies[r].second_offset, valid);
      cp_async_4_or_zero(window + e, src, valid);
    }
  }
};

// v8: a stage's float32 window, rounded to bf16 (nearest even, as v5 rounds) into window16: each
// thread takes 4 channels of a pixel at a time (one 16-byte read, one 8-byte write).
template <class Tile>
__device__ __forceinline__ void halo_window_to_bf16(const float* window, uint16_t* window16, int tid) {
  constexpr int kUnits = Tile::kWindowFloats / 4, P = Tile::kWindowPixels;
#pragma unroll
  for (int r = 0; r < Tile::kConverts; ++r) {
    const int u = tid + kHaloThreads * r;
    if (kUnits % kHaloThreads != 0 && u >= kUnits) break;
    const int g4 = u / P, p = u - g4 * P;  // channels 4 g4 .. 4 g4 + 3 of pixel p
    const float4 v = *reinterpret_cast<const float4*>(window + 4 * u);
    const uint64_t packed = pack_bf16x2(v.x, v.y) | (uint64_t{pack_bf16x2(v.z, v.w)} << 32);
    *reinterpret_cast<uint64_t*>(window16 + ((g4 / 2) * P + p) * 8 + (g4 % 2) * 4) = packed;
  }
}

// One block of v7 or v8: patch blockIdx.x (image n = blockIdx.x / patches, then patch row, patch
// column), output channels blockIdx.y * BN .., input-channel slices of split blockIdx.z. `g`: the
// op's GEMM view, for its M, cols and epilogue only; `wt`: conv3x3_halo_weights' arrangement.
template <class Gemm, class Tile>
__device__ __forceinline__ void halo_conv_block(const Gemm& g, const HaloInput& in,
                                                const void* __restrict__ wt, float* smem) {
  using Math = typename Tile::Math;
  constexpr int BN = Tile::kBN, S = kHaloStages, MT = Tile::kUnitsPerGroup;
  constexpr int WP = Tile::kWP;
  constexpr bool BF16 = Tile::kBF16;
  static_assert(BN == 64 || BN == 128, "m64n64 or m64n128 products");
  static_assert(S >= 3, "a stage being copied, one multiplied, one retiring");

  const int tid = threadIdx.x;
  const int warpgroup = tid / 128;
  const int64_t n = blockIdx.x / in.patches;
  const int patch = static_cast<int>(blockIdx.x - n * in.patches);
  const int py = patch / in.patches_x;
  const int i0 = py * Tile::kPH, j0 = (patch - py * in.patches_x) * Tile::kPW;
  const int o_tile = blockIdx.y;
  int64_t t_begin, t_end;
  k_tile_range(in.slices, t_begin, t_end);

  char* const stages = reinterpret_cast<char*>(smem);
  uint16_t* const windows16 = reinterpret_cast<uint16_t*>(stages + kHaloStages * Tile::kStageBytes);
  const HaloWindowCopies<Tile> window(in, n, i0, j0, tid);
  const char* const wt_tile = static_cast<const char*>(wt) + int64_t{o_tile} * Tile::kBBytes;
  const int64_t wt_slice_bytes = int64_t{in.o_tiles} * Tile::kBBytes;

  // The copies of slice `t` into stage s, as one commit group (an empty one past this block's
  // slices, so that the count of groups in flight is the same every iteration).
  auto issue = [&](int64_t t, int s) {
    if (t < t_end) {
      char* const stage = stages + s * Tile::kStageBytes;
      window.issue(reinterpret_cast<float*>(stage), static_cast<int>(t) * Math::kSliceChannels, tid);
      copy_pieces_16<Tile::kBBytes / 16>(reinterpret_cast<float*>(stage + 4 * Tile::kWindowFloats),
                                         reinterpret_cast<const float*>(wt_tile + t * wt_slice_bytes),
                                         tid);
    }
    cp_async_commit();
  };

  float acc[MT][1][BN / 2];  // [unit][one product of BN columns][its registers]
#pragma unroll
  for (int i = 0; i < MT; ++i) {
#pragma unroll
    for (int j = 0; j < BN / 2; ++j) acc[i][0][j] = 0.0f;
    wgmma_fence_operands(acc[i][0]);
  }

  // The descriptors of tap (0, 0): A of each of this warpgroup's units in stage 0's window (v7)
  // or in the first bf16 window (v8), B of stage 0; every other lies a constant number of bytes
  // further (stage or window, tap). A's LBO is a window's channel group (16 bytes a pixel).
  const char* const a_base = BF16 ? reinterpret_cast<const char*>(windows16) : stages;
  uint64_t a_desc0[MT];
#pragma unroll
  for (int i = 0; i < MT; ++i) {
    const int u = warpgroup * MT + i, uy = u / Tile::kUnitsW, ux = u - uy * Tile::kUnitsW;
    a_desc0[i] = wgmma_descriptor(shared_address(a_base) + 16 * ((8 * uy) * WP + 8 * ux),
                                  16 * Tile::kWindowPixels, 16 * WP);
  }
  const uint64_t b_desc0 = wgmma_descriptor(shared_address(stages + 4 * Tile::kWindowFloats),
                                            Math::kLeadingBytes, Math::kStrideBytes);

  // v6's pipeline: slice t in stage (t - t_begin) % S; at iteration t the products of slice t are
  // issued and those of t - 1 waited for, so at the barrier of iteration t every warpgroup is
  // done with slice t - 2, whose stage takes slice t + S - 2. v8 first converts the stage's window
  // into bf16 window (t - t_begin) % 2, whose last reader, slice t - 2, is retired too; a second
  // barrier then publishes it.
#pragma unroll
  for (int s = 0; s < S - 2; ++s) issue(t_begin + s, s);
  int s = 0;
  for (int64_t t = t_begin; t < t_end; ++t, s = s + 1 == S ? 0 : s + 1) {
    const int w16 = static_cast<int>((t - t_begin) & 1);
    cp_async_wait<S - 3>();  // this thread's copies of slice t have landed ...
    if constexpr (BF16) {
      __syncthreads();       // ... everyone's: the window can be converted
      halo_window_to_bf16<Tile>(reinterpret_cast<const float*>(stages + s * Tile::kStageBytes),
                                windows16 + w16 * (Tile::kWindow16Bytes / 2), tid);
    }
    fence_proxy_async();     // ... and are visible to the tensor cores' reads ...
    __syncthreads();         // ... for every thread's copies; and slice t - 2 is retired
    issue(t + S - 2, s >= 2 ? s - 2 : s + S - 2);
    const uint32_t a_bytes = BF16 ? w16 * Tile::kWindow16Bytes : s * Tile::kStageBytes;
    const uint32_t b_bytes = s * Tile::kStageBytes;
    wgmma_fence();
#pragma unroll
    for (int tap = 0; tap < 9; ++tap) {
      const int ky = tap / 3, kx = tap % 3;
      const uint64_t db = wgmma_descriptor_advance(
          b_desc0, b_bytes + Math::kOperandBytes * tap * BN * Math::kSliceChannels);
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        const uint64_t da = wgmma_descriptor_advance(a_desc0[i], a_bytes + 16 * (ky * WP + kx));
        if constexpr (BF16) wgmma_bf16<BN>(acc[i][0], da, db, true);
        else wgmma_tf32<BN>(acc[i][0], da, db, true);
      }
    }
    wgmma_commit();
    wgmma_wait<1>();
  }
  wgmma_wait<0>();
#pragma unroll
  for (int i = 0; i < MT; ++i) wgmma_fence_operands(acc[i][0]);
  cp_async_wait<0>();  // only empty groups are left

  // Row 16 w + gid + 8 v of a unit's product is its output row 2 w + v, pixel gid.
  const int lane = tid % 32, w = (tid % 128) / 32, gid = lane / 4, tig = lane % 4;
#pragma unroll
  for (int i = 0; i < MT; ++i) {
    const int u = warpgroup * MT + i, uy = u / Tile::kUnitsW, ux = u - uy * Tile::kUnitsW;
    const int j = j0 + 8 * ux + gid;
#pragma unroll
    for (int v = 0; v < 2; ++v) {
      const int ii = i0 + 8 * uy + 2 * w + v;
      if (ii >= in.out_h || j >= in.out_w) continue;
      const int64_t m = (n * in.out_h + ii) * in.out_w + j;
      store_wgmma_row<Gemm, 1, BN>(g, m, acc[i], v, o_tile * BN, tig);
    }
  }
}

// =================================================================================================
// v9_fp32_halo: the same window on the CUDA cores (FP32 FFMA), for the fp32 mode
// =================================================================================================
//
// v2_smem staged a tile of the input with its 1-pixel border once for all nine taps, but each
// thread computed one output at a time (a load per FFMA); v3_igemm keeps 8 x 8 outputs per thread
// in registers (a load per 4 FFMAs) but copies the im2col matrix, each input element up to nine
// times, 8 of K per barrier. v9 is both: a block's output patch (16 x 8 pixels by 128 output
// channels, or 16 x 16 by 64) reads its window of each slice of 8 input channels from shared
// memory, laid out as planes, window[c][r][s] (a row of 18 pixels padded to 20 floats, so that
// rows start 16-byte aligned), and each thread keeps 8 consecutive pixels of one output row by 8
// output channels in registers. For one channel and one kernel row ky, a thread reads the 10
// window pixels its 8 outputs and the three kx see (three loads: 16 + 16 + 8 bytes), then per kx
// the 8 weights of its channels (two 16-byte loads) and does 64 FFMAs: 192 FFMAs for 9 loads, and
// 72 of K (8 channels x 9 taps) between two barriers instead of v3's 8.
//
// The weights of a slice are prearranged (conv3x3_halo_weights with FfmaHaloMath) as the stage
// holds them, B[k][column], k = 8 tap + channel: a thread's 8 columns are two runs of 4, half the
// tile apart (column 4 og + j, and BN / 2 + 4 og + j), so that 8 consecutive threads read 8
// consecutive 16-byte pieces (128 bytes on 32 banks). Two stages: the copies of slice t + 1 are in
// flight during the 4,608 FFMAs per thread of slice t. The output goes through shared memory
// (the stages are free by then) so that consecutive threads store consecutive pixels through the
// view's epilogue.

// v9's slice of the weights: 8 channels, B[k][row] with the rows (output channels) contiguous.
struct FfmaHaloMath {
  static constexpr bool kBF16 = false;
  static constexpr bool kRowsFast = true;  // conv3x3_halo_weights: consecutive threads, consecutive rows
  static constexpr int kSliceChannels = 8;
  static constexpr int kSliceK = 9 * kSliceChannels;
  __host__ __device__ static constexpr int b_at(int bn, int row, int k) { return k * bn + row; }
};

// A block tile of v9: a 16 x PH output patch by BN output channels, 256 threads of 8 pixels (one
// output row's) by 8 channels: (2 PH pixel groups) x (BN / 8 channel groups). A warp is 4 pixel
// groups by 8 channel groups.
template <int PH, int BN_>
struct FfmaHaloTile {
  using Math = FfmaHaloMath;
  static constexpr bool kBF16 = false;
  static constexpr bool kFfma = true;
  static constexpr int kBN = BN_;
  static constexpr int kPW = 16, kPH = PH;
  static constexpr int kWP = kPW + 2, kHP = kPH + 2;  // the window
  static constexpr int kRowStride = 20;               // floats from one window row to the next
  static constexpr int kPlane = kHP * kRowStride;     // one channel's window
  static constexpr int kWindowPixels = kWP * kHP;
  static constexpr int kWindowFloats = Math::kSliceChannels * kPlane;
  static constexpr int kBFloats = Math::kSliceK * BN_;
  static constexpr int kStageFloats = kWindowFloats + kBFloats;
  static constexpr int kStages = 2;
  static constexpr int kPixelGroups = 2 * PH, kChannelGroups = BN_ / 8;
  static constexpr int kWarpsN = kChannelGroups / 8;  // warps side by side along the channels
  static_assert(kPixelGroups * kChannelGroups == kHaloThreads && kChannelGroups % 8 == 0,
                "256 threads of 8 x 8 outputs, a warp 4 pixel groups by 8 channel groups");
  static_assert(kRowStride >= kWP && kRowStride % 4 == 0 && kWindowFloats % 4 == 0,
                "window rows and B start 16-byte aligned");
  // The epilogue's staging of the block's outputs: [BN][pixels + 4] floats.
  static constexpr int kPatchPixels = kPW * kPH, kOutStride = kPatchPixels + 4;
  static constexpr size_t kSmemBytes =
      4 * static_cast<size_t>(kStages * kStageFloats > BN_ * kOutStride ? kStages * kStageFloats
                                                                         : BN_ * kOutStride);
  static constexpr int kPixelSets = ceil_div(kWindowPixels, kHaloThreads);  // window pixels a thread copies
  static constexpr int kWindowChannels = Math::kSliceChannels, kCopyGroups = 1;
  static_assert(kSmemBytes <= 113 * 1024, "two blocks fit an SM");
};
// Two blocks per SM (256 threads each, 128 registers per thread or fewer; ptxas, docs/CONV3X3.md):
// the other block's FFMAs cover a block's barrier and its first copies.
constexpr int kFfmaHaloBlocksPerSM = 2;
// 16 x 8 pixels by 128 channels: 85 KB (two stages of 42 KB).
using FfmaHaloWide = FfmaHaloTile<8, 128>;
// 16 x 16 pixels by 64 channels, for the outputs of 64 channels or fewer: 65 KB (the epilogue's
// staging; its two stages take 59 KB).
using FfmaHaloTall = FfmaHaloTile<16, 64>;
static_assert(FfmaHaloWide::kPW == HaloWide<false>::kPW && FfmaHaloWide::kPH == HaloWide<false>::kPH &&
                  FfmaHaloTall::kPH == HaloTall<false>::kPH && FfmaHaloWide::kBN == HaloWide<false>::kBN &&
                  FfmaHaloTall::kBN == HaloTall<false>::kBN,
              "v9 has v7's patches (halo_patches)");

// A thread's copies of the channels c0 .. c0 + Tile::kWindowChannels - 1 into the planes of
// `window` (Tile's kWP x kHP pixels, rows kRowStride and planes kPlane floats apart): thread tid
// takes window pixel tid % pixels (and + 256, .. where a window has more pixels than a block
// threads), of the channels of its group tid / pixels (Tile::kCopyGroups groups share the
// channels where two windows' pixels fit the block). Consecutive threads read consecutive pixels
// of a row; a thread works out each pixel's place in the sources once per issue, and its channels
// lie a constant stride apart (v7's copy of element e, whose channel and pixel both vary with e,
// would hold a source decode per copy in registers that v9 keeps for its sums).
template <class Tile>
__device__ __forceinline__ void ffma_halo_window_issue(const HaloInput& in, int n, int i0, int j0,
                                                       int c0, float* window, int tid) {
  constexpr int G = Tile::kCopyGroups, P = Tile::kWindowPixels;
  constexpr int CG = Tile::kWindowChannels / G;  // channels a thread copies per pixel
  static_assert(CG * G == Tile::kWindowChannels && (G == 1 || (G * P <= kHaloThreads &&
                                                                Tile::kPixelSets == 1)),
                "the copy groups split the channels, each group one pixel per thread");
  const int group = G == 1 ? 0 : tid / P;
  if (G > 1 && group >= G) return;
  const int first_pixel = tid - group * P;
  const HaloImages images(in, n);
#pragma unroll
  for (int q = 0; q < Tile::kPixelSets; ++q) {
    const int p = first_pixel + kHaloThreads * q;
    if (P % kHaloThreads != 0 && p >= P) break;
    const int wy = p / Tile::kWP, wx = p - wy * Tile::kWP;
    const int first_offset = halo_pixel_offset(in.first, i0 + wy, j0 + wx);
    const int second_offset =
        in.second.channels > 0 ? halo_pixel_offset(in.second, i0 + wy, j0 + wx) : -1;
    float* const dst = window + (group * CG) * Tile::kPlane + wy * Tile::kRowStride + wx;
#pragma unroll
    for (int c = 0; c < CG; ++c) {
      bool valid;
      const float* src = images.source(c0 + group * CG + c, first_offset, second_offset, valid);
      cp_async_4_or_zero(dst + c * Tile::kPlane, src, valid);
    }
  }
}

// A thread's values of its 8 output channels, two runs of 4 `kHalf` floats apart (half a tile):
// two 16-byte shared loads.
template <int kHalf>
__device__ __forceinline__ void load_channel_runs(const float* p, float (&v)[8]) {
  const float4 lo = *reinterpret_cast<const float4*>(p);
  const float4 hi = *reinterpret_cast<const float4*>(p + kHalf);
  v[0] = lo.x, v[1] = lo.y, v[2] = lo.z, v[3] = lo.w;
  v[4] = hi.x, v[5] = hi.y, v[6] = hi.z, v[7] = hi.w;
}

template <int R, int C>
__device__ __forceinline__ void zero_accumulators(float (&a)[R][C]) {
#pragma unroll
  for (int i = 0; i < R; ++i)
#pragma unroll
    for (int j = 0; j < C; ++j) a[i][j] = 0.0f;
}

// One block of v9: blocks as v7's (halo_conv_block); `wt` in FfmaHaloMath's arrangement.
template <class Gemm, class Tile>
__device__ __forceinline__ void ffma_halo_conv_block(const Gemm& g, const HaloInput& in,
                                                     const float* __restrict__ wt, float* smem) {
  constexpr int BN = Tile::kBN, RS = Tile::kRowStride, SC = FfmaHaloMath::kSliceChannels;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int og = lane % 8 + 8 * (warp % Tile::kWarpsN);  // channels 4 og .., BN / 2 + 4 og ..
  const int pg = lane / 8 + 4 * (warp / Tile::kWarpsN);  // patch row pg / 2, pixels 8 (pg % 2) ..
  const int py = pg / 2, px0 = 8 * (pg % 2);
  // 32-bit block coordinates and slice counters (registers are what limits v9: two blocks per SM
  // give each thread 128); the weights' address is worked out at each issue
  const int n = static_cast<int>(blockIdx.x / in.patches);
  const int patch = static_cast<int>(blockIdx.x - static_cast<int64_t>(n) * in.patches);
  const int patch_y = patch / in.patches_x;
  const int i0 = patch_y * Tile::kPH, j0 = (patch - patch_y * in.patches_x) * Tile::kPW;
  int64_t begin64, end64;
  k_tile_range(in.slices, begin64, end64);
  const int t_begin = static_cast<int>(begin64), t_end = static_cast<int>(end64);

  // The copies of slice t into stage s, one commit group (empty past this block's slices).
  auto issue = [&](int t, int s) {
    if (t < t_end) {
      float* const stage = smem + s * Tile::kStageFloats;
      ffma_halo_window_issue<Tile>(in, n, i0, j0, t * SC, stage, tid);
      copy_pieces_16<Tile::kBFloats / 4>(
          stage + Tile::kWindowFloats,
          wt + (static_cast<int64_t>(t) * in.o_tiles + blockIdx.y) * Tile::kBFloats, tid);
    }
    cp_async_commit();
  };

  float acc[8][8];  // [pixel px0 + i][channel j]
  zero_accumulators(acc);
  issue(t_begin, 0);
  int s = 0;
  for (int t = t_begin; t < t_end; ++t, s ^= 1) {
    cp_async_wait<0>();  // this thread's copies of slice t have landed ...
    __syncthreads();     // ... everyone's; and everyone is done with slice t - 1's stage
    issue(t + 1, s ^ 1);
    const float* const window = smem + s * Tile::kStageFloats + py * RS + px0;
    const float* const b = smem + s * Tile::kStageFloats + Tile::kWindowFloats + 4 * og;
#pragma unroll 1
    for (int c = 0; c < SC; ++c) {
#pragma unroll
      for (int ky = 0; ky < 3; ++ky) {
        const float* const row = window + c * Tile::kPlane + ky * RS;
        const float4 a0 = *reinterpret_cast<const float4*>(row);
        const float4 a1 = *reinterpret_cast<const float4*>(row + 4);
        const float2 a2 = *reinterpret_cast<const float2*>(row + 8);
        const float a[10] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w, a2.x, a2.y};
#pragma unroll
        for (int kx = 0; kx < 3; ++kx) {
          float w[8];
          load_channel_runs<BN / 2>(b + (SC * (3 * ky + kx) + c) * BN, w);
#pragma unroll
          for (int i = 0; i < 8; ++i)
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i + kx], w[j], acc[i][j]);
        }
      }
    }
  }
  cp_async_wait<0>();  // only empty groups are left
  __syncthreads();     // every thread is done with the stages: the outputs take their place

  // out[column][pixel]: a thread writes its 8 pixels of each of its columns (two 16-byte stores),
  // then reads one pixel of BN / (256 / pixels) columns, consecutive threads consecutive pixels.
  float* const out = smem;
  constexpr int OS = Tile::kOutStride, NPX = Tile::kPatchPixels;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    float* const dst = out + ((j / 4) * (BN / 2) + 4 * og + j % 4) * OS + py * Tile::kPW + px0;
    *reinterpret_cast<float4*>(dst) = make_float4(acc[0][j], acc[1][j], acc[2][j], acc[3][j]);
    *reinterpret_cast<float4*>(dst + 4) = make_float4(acc[4][j], acc[5][j], acc[6][j], acc[7][j]);
  }
  __syncthreads();
  constexpr int kColumnStep = kHaloThreads / NPX;
  static_assert(kHaloThreads % NPX == 0, "every thread stores one pixel");
  const int px = tid % NPX;
  const int ii = i0 + px / Tile::kPW, jj = j0 + px % Tile::kPW;
  if (ii >= in.out_h || jj >= in.out_w) return;
  const typename Gemm::CRow row = g.c_row((static_cast<int64_t>(n) * in.out_h + ii) * in.out_w + jj);
  // this thread's columns: tid / NPX + kColumnStep r of the tile
  const int first_column = tid / NPX, tile_col0 = static_cast<int>(blockIdx.y) * BN;
  if constexpr (ViewReadsBeforeStore<Gemm>::value) {
    // A view that reads a value per element for its store (the ReLU masks): 16 reads in flight,
    // then their 16 stores, rather than a read waiting before each store (v6's epilogue too).
    constexpr int kBatch = 16;
    static_assert((BN / kColumnStep) % kBatch == 0, "whole batches of columns");
#pragma unroll 1
    for (int r0 = 0; r0 < BN / kColumnStep; r0 += kBatch) {
      float input[kBatch];
#pragma unroll
      for (int r = 0; r < kBatch; ++r) {
        const int col = tile_col0 + first_column + kColumnStep * (r0 + r);
        input[r] = col < g.cols ? g.store_input(row, col) : 0.0f;
      }
#pragma unroll
      for (int r = 0; r < kBatch; ++r) {
        const int column = first_column + kColumnStep * (r0 + r);
        if (tile_col0 + column < g.cols)
          g.store_with(row, tile_col0 + column, out[column * OS + px], input[r]);
      }
    }
  } else {
#pragma unroll 4
    for (int r = 0; r < BN / kColumnStep; ++r) {
      const int column = first_column + kColumnStep * r;
      if (tile_col0 + column < g.cols) g.store(row, tile_col0 + column, out[column * OS + px]);
    }
  }
}

// -------------------------------------------------------------------------------------------------
// v9's weight gradient: the window from the pixel side
// -------------------------------------------------------------------------------------------------
//
// dw[o, c, ky, kx] = sum over pixels (n, i, j) of dy[n, o, i, j] x[n, c, i + ky, j + kx]. v3 runs
// it as a GEMM over K = the pixels whose B is the im2col of x: per K tile of 8 pixels, each x
// element copied once for each of the 9 columns (c, ky, kx) it appears in. v9 stages, per patch
// of 4 output rows by 16 pixels (64 of K), the patch's dy for BO output channels, as dy[pixel][o],
// and the x window the patch reads (6 x 18 pixels) for BC input channels, once. A thread owns 8
// output channels (two runs of 4, BO / 2 apart, as the forward's) of one input channel, all nine
// taps: 72 sums. It walks each patch row pixel by pixel, keeping the 3 x 3 x values the pixel's
// taps read in registers: a step to the next pixel loads the 3 values of the new column, and the
// pixel's 8 dy values (two 16-byte loads), for 72 FFMAs. The patches of all images are K; they
// split over blockIdx.z into partials that conv3x3_split_k_reduce adds in a fixed order.

// A block tile of v9's weight gradient: BO output channels by BC input channels (x 9 taps), 256
// threads of (BO / 8 output-channel groups) x BC; a warp is 8 output-channel groups by 4 input
// channels.
template <int BO_, int BC_>
struct FfmaWeightTile {
  static constexpr int kBO = BO_, kBC = BC_;
  static constexpr int kPR = 4, kPL = 16, kPixels = kPR * kPL;  // the patch: 64 of K
  static constexpr int kWP = kPL + 2, kHP = kPR + 2;             // its x window
  static constexpr int kRowStride = kWP, kPlane = kHP * kWP;     // scalar reads: no padding
  static constexpr int kWindowPixels = kWP * kHP;
  static constexpr int kWindowChannels = BC_;
  static constexpr int kCopyGroups = 2, kPixelSets = 1;          // 2 x 108 of the 256 threads copy
  static constexpr int kDyStride = BO_ + 4;  // dy[pixel][o]: a warp's copies (8 pixels by 4
                                             // channels) write 32 distinct banks
  static constexpr int kDyFloats = kPixels * kDyStride;
  static constexpr int kWindowFloats = BC_ * kPlane;
  static constexpr int kStageFloats = kDyFloats + (kWindowFloats + 3) / 4 * 4;  // 16-byte aligned
  static constexpr int kStages = 2;
  static constexpr size_t kSmemBytes = 4 * static_cast<size_t>(kStages * kStageFloats);
  static constexpr int kOGroups = BO_ / 8, kWarpsO = kOGroups / 8;
  static_assert(kOGroups * BC_ == kHaloThreads && kOGroups % 8 == 0 && kPixels == 64,
                "256 threads of 8 x 9 sums; the dy copies take 8 pixels of each warp");
  static_assert(kCopyGroups * kWindowPixels <= kHaloThreads, "a window pixel per copying thread");
  static_assert(kSmemBytes <= 113 * 1024, "two blocks fit an SM");
};
// 128 output channels by 16 input channels: 80 KB; 64 by 32 where the output has 64 or fewer
// (the 64-channel layers): 61 KB.
using FfmaWeightWide = FfmaWeightTile<128, 16>;
using FfmaWeightTall = FfmaWeightTile<64, 32>;

// What a weight-gradient block reads besides the x window's sources (HaloInput: out_h x out_w is
// dy's plane, patches_x and patches its patches of 4 x 16, per image).
struct FfmaWeightArgs {
  const float* dy;  // [N, O, out_h, out_w]
  float* out;       // dw [O, C, 3, 3], or split s's partial at out + s * O * C * 9
  int O;
  int64_t units;    // patches of all images: the K that blockIdx.z splits
};

// Patch u of the weight gradient's K (image, then patch row, patch column): its image and its
// first output pixel, and how many of its rows and columns lie inside dy.
struct FfmaWeightPatch {
  int n, i0, j0, rows, cols;
};
template <class Tile>
__device__ __forceinline__ FfmaWeightPatch ffma_weight_patch(const HaloInput& in, int64_t u) {
  const int n = static_cast<int>(u / in.patches);
  const int patch = static_cast<int>(u - static_cast<int64_t>(n) * in.patches);
  const int py = patch / in.patches_x;
  const int i0 = py * Tile::kPR, j0 = (patch - py * in.patches_x) * Tile::kPL;
  const int rows = in.out_h - i0, cols = in.out_w - j0;
  return {n, i0, j0, rows < Tile::kPR ? rows : Tile::kPR, cols < Tile::kPL ? cols : Tile::kPL};
}

template <class Tile>
__device__ __forceinline__ void ffma_weight_block(const HaloInput& in, const FfmaWeightArgs& a,
                                                  float* smem) {
  constexpr int BO = Tile::kBO, PL = Tile::kPL, RS = Tile::kRowStride;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int og = lane % 8 + 8 * (warp % Tile::kWarpsO);  // output channels 4 og .., BO / 2 + 4 og ..
  const int cl = lane / 8 + 4 * (warp / Tile::kWarpsO);  // the input channel
  const int o0 = blockIdx.x * BO, c0 = blockIdx.y * Tile::kBC;
  const int C = in.channels();
  const int plane = in.out_h * in.out_w;
  int64_t begin64, end64;
  k_tile_range(a.units, begin64, end64);
  // This thread's dy copies: pixel lane % 8 + 8 warp of the patch, channels lane / 8 + 4 r.
  const int copy_pixel = lane % 8 + 8 * warp, copy_o = lane / 8;
  const int copy_r = copy_pixel / PL, copy_c = copy_pixel - copy_r * PL;

  // The copies of patch u (image, then patch row, patch column) into stage s, one commit group.
  auto issue = [&](int64_t u, int s) {
    if (u < end64) {
      float* const stage = smem + s * Tile::kStageFloats;
      const FfmaWeightPatch p = ffma_weight_patch<Tile>(in, u);
      ffma_halo_window_issue<Tile>(in, p.n, p.i0, p.j0, c0, stage + Tile::kDyFloats, tid);
      const int i = p.i0 + copy_r, j = p.j0 + copy_c;
      const bool pixel = copy_r < p.rows && copy_c < p.cols;
      const float* const src = a.dy + (static_cast<int64_t>(p.n) * a.O + o0 + copy_o) * plane +
                               (pixel ? i * in.out_w + j : 0);
      float* const dst = stage + copy_pixel * Tile::kDyStride + copy_o;
#pragma unroll 8
      for (int r = 0; r < BO / 4; ++r) {
        const bool valid = pixel && o0 + copy_o + 4 * r < a.O;
        cp_async_4_or_zero(dst + 4 * r, valid ? src + static_cast<int64_t>(4 * r) * plane : a.dy,
                           valid);
      }
    }
    cp_async_commit();
  };

  float acc[8][9];  // [output channel j][tap]
  zero_accumulators(acc);
  // Two stages, as the forward's. (A shared helper taking the loop body as a lambda cost the
  // forward up to 48 bytes of spills in ptxas for sm_90a, so each kernel keeps its loop.)
  issue(begin64, 0);
  int s = 0;
  for (int64_t u = begin64; u < end64; ++u, s ^= 1) {
    cp_async_wait<0>();  // this thread's copies of patch u have landed ...
    __syncthreads();     // ... everyone's; and everyone is done with patch u - 1's stage
    issue(u + 1, s ^ 1);
    const float* const dys = smem + s * Tile::kStageFloats + 4 * og;
    const float* const xs = smem + s * Tile::kStageFloats + Tile::kDyFloats + cl * Tile::kPlane;
    // The patch's pixels inside dy (the same for the whole block): the walk stops at its edge, so
    // that no x is multiplied by a padding pixel's zero (which would turn an Inf of x into a NaN
    // that the sum over real pixels never has) and no FFMA is spent there.
    const FfmaWeightPatch patch = ffma_weight_patch<Tile>(in, u);
    const int rows = patch.rows, cols = patch.cols;
#pragma unroll 1
    for (int r = 0; r < rows; ++r) {
      const float* const xr = xs + r * RS;
      float col[3][3];  // col[ky][kx] = x[r + ky][j + kx] at pixel j of the row
#pragma unroll
      for (int ky = 0; ky < 3; ++ky) col[ky][0] = xr[ky * RS], col[ky][1] = xr[ky * RS + 1];
#pragma unroll
      for (int j = 0; j < PL; ++j) {
        if (j >= cols) break;
#pragma unroll
        for (int ky = 0; ky < 3; ++ky) col[ky][2] = xr[ky * RS + j + 2];
        float dv[8];
        load_channel_runs<BO / 2>(dys + (r * PL + j) * Tile::kDyStride, dv);
#pragma unroll
        for (int o = 0; o < 8; ++o)
#pragma unroll
          for (int t = 0; t < 9; ++t) acc[o][t] = fmaf(dv[o], col[t / 3][t % 3], acc[o][t]);
#pragma unroll
        for (int ky = 0; ky < 3; ++ky) col[ky][0] = col[ky][1], col[ky][1] = col[ky][2];
      }
    }
  }
  cp_async_wait<0>();  // only empty groups are left

  const int c = c0 + cl;
  if (c >= C) return;
  float* const out = a.out + static_cast<int64_t>(blockIdx.z) * a.O * C * 9;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int o = o0 + (j / 4) * (BO / 2) + 4 * og + j % 4;
    if (o >= a.O) continue;
    float* const row = out + (static_cast<int64_t>(o) * C + c) * 9;
#pragma unroll
    for (int t = 0; t < 9; ++t) row[t] = acc[j][t];
  }
}

#ifdef UNET_CPU_EMULATION
#define UNET_HALO_SMEM float* smem = cpu_emulation::dynamic_shared<float>();
#else
#define UNET_HALO_SMEM extern __shared__ __align__(16) float smem[];
#endif

// v7: TF32, the float32 window itself the operand.
template <class Gemm, class Tile>
__global__ void __launch_bounds__(kHaloThreads) conv3x3_v7_tf32_halo(const Gemm g, const HaloInput in,
                                                                     const void* __restrict__ wt) {
  static_assert(!Tile::kBF16, "v7 takes the TF32 tiles");
  UNET_HALO_SMEM
  halo_conv_block<Gemm, Tile>(g, in, wt, smem);
}

// v8: bf16, the window rounded into a bf16 one per slice, bf16 weights.
template <class Gemm, class Tile>
__global__ void __launch_bounds__(kHaloThreads) conv3x3_v8_bf16_halo(const Gemm g, const HaloInput in,
                                                                     const void* __restrict__ wt) {
  static_assert(Tile::kBF16, "v8 takes the bf16 tiles");
  UNET_HALO_SMEM
  halo_conv_block<Gemm, Tile>(g, in, wt, smem);
}

// v9: FP32 FFMA on the CUDA cores (any GPU of the build), two blocks per SM.
template <class Gemm, class Tile>
__global__ void __launch_bounds__(kHaloThreads, kFfmaHaloBlocksPerSM)
    conv3x3_v9_fp32_halo(const Gemm g, const HaloInput in, const void* __restrict__ wt) {
  static_assert(Tile::kFfma, "v9 takes the FFMA tiles");
  UNET_HALO_SMEM
  ffma_halo_conv_block<Gemm, Tile>(g, in, static_cast<const float*>(wt), smem);
}

// v9's weight gradient (FP32 FFMA), two blocks per SM.
template <class Tile>
__global__ void __launch_bounds__(kHaloThreads, kFfmaHaloBlocksPerSM)
    conv3x3_v9_fp32_halo_weight(const HaloInput in, const FfmaWeightArgs a) {
  UNET_HALO_SMEM
  ffma_weight_block<Tile>(in, a, smem);
}

#undef UNET_HALO_SMEM

// The kernel of a tile: v9's for the FFMA tiles, v8's for the bf16 ones, v7's for the others.
template <class Gemm, class Tile>
constexpr auto halo_kernel() {
  if constexpr (Tile::kFfma) return conv3x3_v9_fp32_halo<Gemm, Tile>;
  else if constexpr (Tile::kBF16) return conv3x3_v8_bf16_halo<Gemm, Tile>;
  else return conv3x3_v7_tf32_halo<Gemm, Tile>;
}

}  // namespace unet
