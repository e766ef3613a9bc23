// reduce.cuh: deterministic block-wide sums for the reduction kernels (weight and bias gradients,
// the loss). No atomics: each thread first adds its own elements in a fixed order, then the block
// combines the per-thread sums in a fixed tree (warp shuffles, then one warp over the warp sums).
// For a fixed block size the result is therefore bitwise reproducible run after run.
#pragma once

#include <cuda_runtime.h>

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
