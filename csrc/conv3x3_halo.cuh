// conv3x3_halo.cuh: v7_tf32_halo, the forward and the backward data of the 3x3 convolution on
// Hopper's warpgroup MMA (sm_90a), with the input copied once for all nine taps. Included by
// conv3x3.cu, after implicit_gemm.cuh (whose wgmma, cp.async and split-K pieces it uses).
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
  int slices;              // ceil(channels / the slice's channels: 8 in v7, 16 in v8)
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
  static constexpr int kBCopies = ceil_div(kBBytes / 16, kHaloThreads);   // per thread, 16 bytes
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
// (HaloMath::b_at; v7's is v6's V6Smem<BN, 72>): wt[(slice * o_tiles + tile) * BN * kSliceK +
// b_at(BN, row, k)], float32 for v7, bf16 (rounded to nearest even, as v5 rounds) for v8. Zero past
// either channel count. Forward: w[o, c, tap] for output o and input c. flip (the backward data):
// the outputs are dx's channels c and the inputs dy's o, and tap t takes w[o, c, 8 - t].
// One thread per (output channel, input channel) of the padded ranges, its nine taps: the nine
// floats are contiguous in w, and consecutive threads take the pair next to it in memory (the
// input channel forward, the output channel flipped), so the reads coalesce.
template <bool BF16>
__global__ void conv3x3_halo_weights(const float* __restrict__ w, void* __restrict__ wt, int C,
                                     int O, bool flip, int bn, int o_tiles, int slices) {
  using Math = HaloMath<BF16>;
  const int out_channels = flip ? C : O, in_channels = flip ? O : C;
  const int out_padded = o_tiles * bn, in_padded = slices * Math::kSliceChannels;
  const int64_t total = static_cast<int64_t>(out_padded) * in_padded;
  for (int64_t e = global_thread(); e < total; e += grid_stride()) {
    // the fast index: the one along which w's (o, c) pairs are contiguous
    const int64_t major = flip ? e / out_padded : e / in_padded;
    const int minor = static_cast<int>(e - major * (flip ? out_padded : in_padded));
    const int oc = flip ? minor : static_cast<int>(major), ic = flip ? static_cast<int>(major) : minor;
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
      if constexpr (BF16)
        static_cast<uint16_t*>(wt)[at] = static_cast<uint16_t>(pack_bf16x2(v, 0.0f) & 0xFFFFu);
      else
        static_cast<float*>(wt)[at] = v;
    }
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

// The copies of a thread into the float32 window of a slice: window[g][p][c % 4], float e = (g *
// pixels + p) * 4 + c % 4 taken by thread e % 256 (a warp's copies write 128 consecutive bytes).
// The sources are decided once per block (HaloCopy), the slice's channels per issue.
template <class Tile>
struct HaloWindowCopies {
  HaloCopy copies[Tile::kACopies];
  const float* first_image;
  const float* second_image;
  int first_plane, second_plane, first_channels, channels;

  __device__ HaloWindowCopies(const HaloInput& in, int64_t n, int i0, int j0, int tid) {
    const HaloSource& first = in.first;
    const HaloSource& second = in.second;
    first_image = first.p + n * first.channels * first.h * first.w;
    second_image = second.p + n * second.channels * second.h * second.w;
    first_plane = first.h * first.w;
    second_plane = second.h * second.w;
    first_channels = first.channels;
    channels = in.channels();
#pragma unroll
    for (int r = 0; r < Tile::kACopies; ++r) {
      const int e = tid + kHaloThreads * r;
      const int group = e / (4 * Tile::kWindowPixels);
      const int p = (e - group * 4 * Tile::kWindowPixels) / 4;
      const int wy = p / Tile::kWP, wx = p - wy * Tile::kWP;
      copies[r].channel = 4 * group + e % 4;  // past the window: never issued
      copies[r].first_offset = halo_pixel_offset(first, i0 + wy, j0 + wx);
      copies[r].second_offset =
          second.channels > 0 ? halo_pixel_offset(second, i0 + wy, j0 + wx) : -1;
    }
  }

  // This thread's copies of the slice of channels c0 .. into `window` (zeros outside the sources
  // and past their channels); commits nothing.
  __device__ void issue(float* window, int c0, int tid) const {
#pragma unroll
    for (int r = 0; r < Tile::kACopies; ++r) {
      const int e = tid + kHaloThreads * r;
      if (Tile::kWindowFloats % kHaloThreads != 0 && e >= Tile::kWindowFloats) break;
      const int c = c0 + copies[r].channel;
      const float* src = first_image;  // a valid address where nothing is read
      bool valid = false;
      if (c < first_channels) {
        valid = copies[r].first_offset >= 0;
        src = first_image + c * first_plane + (valid ? copies[r].first_offset : 0);
      } else if (c < channels) {
        valid = copies[r].second_offset >= 0;
        src = second_image + (c - first_channels) * second_plane +
              (valid ? copies[r].second_offset : 0);
      }
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
      float* const b = reinterpret_cast<float*>(stage + 4 * Tile::kWindowFloats);
      const float* const wsrc = reinterpret_cast<const float*>(wt_tile + t * wt_slice_bytes);
#pragma unroll
      for (int r = 0; r < Tile::kBCopies; ++r) {
        const int piece = tid + kHaloThreads * r;
        if ((Tile::kBBytes / 16) % kHaloThreads != 0 && piece >= Tile::kBBytes / 16) break;
        cp_async_16(b + 4 * piece, wsrc + 4 * piece);
      }
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

#undef UNET_HALO_SMEM

// The kernel of a tile: v8's for the bf16 tiles, v7's for the others.
template <class Gemm, class Tile>
constexpr auto halo_kernel() {
  if constexpr (Tile::kBF16) return conv3x3_v8_bf16_halo<Gemm, Tile>;
  else return conv3x3_v7_tf32_halo<Gemm, Tile>;
}

}  // namespace unet
