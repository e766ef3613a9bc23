// reduce.cuh: deterministic block-wide sums for the reduction kernels (weight and bias gradients,
// the loss). No atomics: each thread first adds its own elements in a fixed order, then the block
// combines the per-thread sums in a fixed tree (warp shuffles, then one warp over the warp sums).
// For a fixed block size the result is therefore bitwise reproducible run after run.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace unet {

constexpr int kWarp = 32;
// Threads per block of every reduction kernel (a multiple of 32, at most 1024).
constexpr int kReduceBlock = 256;

template <typename T>
__device__ inline T warp_sum(T v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2)
    v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sum of f(p) over p = begin, begin + stride, ... below end, kept in kIlp independent partial sums
// (added together in a fixed order at the end). One running sum would make every load wait for
// the add before it: a full memory latency per element, a few GB/s per SM. kIlp sums keep kIlp
// loads in flight per thread. Deterministic: the order depends on (begin, end, stride) only.
template <int kIlp, typename F>
__device__ inline float strided_sum(int64_t begin, int64_t end, int64_t stride, F f) {
  float acc[kIlp];
#pragma unroll
  for (int j = 0; j < kIlp; ++j) acc[j] = 0.0f;
  int64_t p = begin;
  for (; p + (kIlp - 1) * stride < end; p += kIlp * stride) {
#pragma unroll
    for (int j = 0; j < kIlp; ++j) acc[j] += f(p + j * stride);
  }
#pragma unroll
  for (int j = 0; j < kIlp - 1; ++j)  // fewer than kIlp elements are left
    if (p + j * stride < end) acc[j] += f(p + j * stride);
  float sum = 0.0f;
#pragma unroll
  for (int j = 0; j < kIlp; ++j) sum += acc[j];
  return sum;
}

// Independent loads in flight per thread in the reduction kernels (strided_sum).
constexpr int kReduceIlp = 8;
// Threads per block of the reductions that run one block per output channel: few blocks (64 for
// the 64-channel layers, 2 for the output layer) must each keep many loads in flight.
constexpr int kWideReduceBlock = 1024;

// The sliced reductions (conv1x1's weight gradient, the bias gradient): blocks over slices of the
// N*HW pixels instead of one block per output, where those would leave most SMs idle, and a second
// kernel that adds the slices in order. The slice count, from the shapes alone so that every GPU
// sums in the same order: about `target_blocks` blocks for `groups` outputs, each slice over at
// least `min_pixels` pixels, at most `max_slices` slices, at least one.
inline int pixel_slices(int64_t groups, int64_t pixels, int64_t target_blocks, int64_t min_pixels,
                        int64_t max_slices) {
  int64_t s = (target_blocks + groups - 1) / (groups > 0 ? groups : 1);
  s = std::min(s, pixels / min_pixels);
  s = std::min(s, max_slices);
  return static_cast<int>(std::max<int64_t>(s, 1));
}

// Slice s of `slices` over the flat pixels n*HW + p of N images, [total*s/slices,
// total*(s+1)/slices), image by image: f(n, p_begin, p_end) for each image it touches.
template <typename F>
__device__ inline void for_each_slice_image(int N, int64_t HW, int s, int slices, F f) {
  const int64_t total = static_cast<int64_t>(N) * HW;
  const int64_t begin = total * s / slices, end = total * (s + 1) / slices;
  for (int64_t n = HW > 0 ? begin / HW : 0; n < N && n * HW < end; ++n)
    f(n, std::max<int64_t>(begin - n * HW, 0), std::min(end - n * HW, HW));
}

// Sum of v over the whole block; the result is valid in thread 0. Every thread of the block must
// call it (it synchronises), blockDim.x must be a multiple of 32, and `scratch` is __shared__ space
// for 32 values. The scratch may be reused by the next call.
template <typename T>
__device__ inline T block_sum(T v, T* scratch) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int num_warps = blockDim.x / kWarp;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < num_warps ? scratch[lane] : T(0);
    v = warp_sum(v);
  }
  __syncthreads();
  return v;
}

}  // namespace unet
