// dropout.cu: inverted dropout with a counter-based mask, bit-identical to the NumPy reference.
//
// Layout: flat C-contiguous buffers of n elements (any shape; element i is the flat C-order index).
//   mask  uint8   1 keeps the element, 0 drops it
//   x, y  float32 y = x * mask / (1 - p)        (forward)
//   dy,dx float32 dx = dy * mask / (1 - p)      (backward: the same scaling of the gradient)
//
// The mask is the splitmix64 finaliser of docs/OPS.md, all arithmetic modulo 2^64:
//   z = seed + (i + 1) * 0x9E3779B97F4A7C15
//   z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
//   z = (z ^ (z >> 27)) * 0x94D049BB133111EB
//   z = z ^ (z >> 31)
//   u = (z >> 40) / 2^24;  mask[i] = u >= p
// u has 24 bits, so it and the comparison with p are exact in double on both backends.
// The scaling divides by the float32 value of (1 - p), as NumPy does for a float32 array.
//
// The seed reaches the mask kernel in one of two ways, chosen by its launcher's caller:
//   * by value, as a kernel argument (`seed`, with seed_on_device == nullptr). The value is part of
//     the launch: a CUDA graph that captured the launch replays it with that same seed forever.
//   * by address (`seed_on_device`, a uint64 in device memory). Every thread reads it when the
//     kernel runs, so a captured launch replays with whatever the host wrote there since; this is
//     how a graphed training step gets fresh dropout masks every step (unet_cuda/graph.py).
// Both forms run the same kernel and the same hash, so the same seed value gives the same bits.
//
// Kernels:
//   dropout_mask_v1: one element per thread per grid-stride step; hashes its 64-bit index. The
//     seed comes from the argument or, when seed_on_device is not null, from that device word.
//   dropout_apply_v1: one element per thread per grid-stride step; y = x * mask / keep.
//   dropout_seeded_v1: the two fused where dropout sits: each element's mask bit is hashed where
//     it is applied and never stored, y = x * keeps(seed, e) / keep, for the forward (x -> y) and,
//     with the same seed, the backward (dy -> dx). A counter-based mask costs a few integer
//     operations to recompute, less than writing it and reading it back twice; the results are
//     the bits of the mask path (dropout_mask, then dropout_apply_v1).
#include "common.cuh"
#include "launchers.h"

namespace unet {

__device__ inline uint8_t dropout_keeps(uint64_t seed, uint64_t i, double p) {
  uint64_t z = seed + (i + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z = z ^ (z >> 31);
  const double u = static_cast<double>(z >> 40) / 16777216.0;  // 2^24
  return u >= p ? 1 : 0;
}

__global__ void dropout_mask_v1(uint8_t* __restrict__ mask, int64_t n, double p, uint64_t seed,
                                const uint64_t* __restrict__ seed_on_device) {
  // One read per thread, before the loop: the same 8 bytes for every thread (a broadcast).
  const uint64_t s = seed_on_device != nullptr ? *seed_on_device : seed;
  for (int64_t e = global_thread(); e < n; e += grid_stride())
    mask[e] = dropout_keeps(s, static_cast<uint64_t>(e), p);
}

__global__ void dropout_apply_v1(const float* __restrict__ x, const uint8_t* __restrict__ mask,
                                 float* __restrict__ y, int64_t n, float keep) {
  for (int64_t e = global_thread(); e < n; e += grid_stride())
    y[e] = x[e] * static_cast<float>(mask[e]) / keep;
}

__global__ void dropout_seeded_v1(const float* __restrict__ x, float* __restrict__ y, int64_t n,
                                  double p, float keep, uint64_t seed,
                                  const uint64_t* __restrict__ seed_on_device) {
  const uint64_t s = seed_on_device != nullptr ? *seed_on_device : seed;
  for (int64_t e = global_thread(); e < n; e += grid_stride())
    y[e] = x[e] * static_cast<float>(dropout_keeps(s, static_cast<uint64_t>(e), p)) / keep;
}

void launch_dropout_mask(uint8_t* mask, int64_t n, double p, uint64_t seed,
                         const uint64_t* seed_on_device, cudaStream_t stream) {
  if (n == 0) return;
  launch_kernel("dropout_mask_v1", dropout_mask_v1, dim3(grid_1d(n)), dim3(kBlock1d), stream, mask,
                n, p, seed, seed_on_device);
}

void launch_dropout_forward(const float* x, const uint8_t* mask, float* y, int64_t n, double p,
                            cudaStream_t stream) {
  if (n == 0) return;
  const float keep = static_cast<float>(1.0 - p);
  launch_kernel("dropout_apply_v1", dropout_apply_v1, dim3(grid_1d(n)), dim3(kBlock1d), stream, x,
                mask, y, n, keep);
}

void launch_dropout_seeded(const float* x, float* y, int64_t n, double p, uint64_t seed,
                           const uint64_t* seed_on_device, cudaStream_t stream) {
  if (n == 0) return;
  const float keep = static_cast<float>(1.0 - p);
  launch_kernel("dropout_seeded_v1", dropout_seeded_v1, dim3(grid_1d(n)), dim3(kBlock1d), stream, x,
                y, n, p, keep, seed, seed_on_device);
}

void launch_dropout_backward(const float* dy, const uint8_t* mask, float* dx, int64_t n, double p,
                             cudaStream_t stream) {
  // The gradient is masked and scaled exactly like the activations.
  launch_dropout_forward(dy, mask, dx, n, p, stream);
}

}  // namespace unet
