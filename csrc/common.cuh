// common.cuh: helpers shared by every kernel file and by the bindings.
//
// * CUDA_CHECK(call, op): runs a CUDA runtime call and throws std::runtime_error naming the op,
//   the call, the file and the line when it fails.
// * CHECK_LAUNCH(kernel): after every <<<...>>>, reports a bad launch configuration (and any
//   error left by earlier asynchronous work) as a std::runtime_error naming the kernel.
// * ceil_div, and the grid of the one-thread-per-element kernels (grid_1d + grid-stride loops).
// * launch_kernel / launch_kernel_smem: launch on a stream and check the launch (in .cu files; in
//   the CPU emulation of tests/cpu_emulation they run the kernel there).
//
// Sizes are int per dimension (every dimension of a U-Net tensor fits), but every flat index and
// every product of dimensions is int64_t: a batch of 572x572 tiles with 64 channels passes 2^31
// elements at 103 images.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace unet {

[[noreturn]] inline void throw_cuda_error(cudaError_t err, const char* op, const char* call,
                                          const char* file, int line) {
  throw std::runtime_error(std::string(op) + ": " + call + " failed at " + file + ":" +
                           std::to_string(line) + ": " + cudaGetErrorName(err) + ": " +
                           cudaGetErrorString(err));
}

#define CUDA_CHECK(call, op)                                                   \
  do {                                                                         \
    const cudaError_t unet_err_ = (call);                                      \
    if (unet_err_ != cudaSuccess)                                              \
      ::unet::throw_cuda_error(unet_err_, (op), #call, __FILE__, __LINE__);    \
  } while (0)

#define CHECK_LAUNCH(kernel_name) CUDA_CHECK(cudaGetLastError(), (kernel_name))

template <typename T>
__host__ __device__ constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

// Threads per block of the one-thread-per-element kernels.
constexpr int kBlock1d = 256;
// Cap on their grid: each thread then walks a grid-stride loop, so any element count works, and
// 65536 blocks of 256 threads are far more than an H100 holds at once (132 SMs x 2048 threads).
constexpr int64_t kMaxGrid1d = 65536;

inline unsigned int grid_1d(int64_t n, int block = kBlock1d) {
  const int64_t blocks = ceil_div<int64_t>(n, block);
  return static_cast<unsigned int>(blocks < kMaxGrid1d ? blocks : kMaxGrid1d);
}

// A gradient with a ReLU's backward fused in: v where relu_mask[i] > 0, else 0 (the bits of
// relu_backward(relu_mask, v)); v itself where relu_mask is null. The backward-data ops take the
// mask where their input x is a ReLU's output (x itself), so that no separate ReLU pass is needed.
// relu_masked reads and applies in one step. An epilogue that stores as it goes then reads,
// stores, reads, stores: a read may not pass a store it could alias, so each element waits a full
// memory latency (the SASS of v6's epilogue). v6 therefore reads a row's mask values first
// (relu_mask_value: 1 where there is no mask), then stores them applied (relu_masked_by). The mask
// is read through the read-only path (ld.global.nc) on the GPU: it is never written by the kernel.
__host__ __device__ inline float relu_mask_value(const float* relu_mask, int64_t i) {
#if defined(__CUDA_ARCH__)
  return relu_mask == nullptr ? 1.0f : __ldg(relu_mask + i);
#else
  return relu_mask == nullptr ? 1.0f : relu_mask[i];
#endif
}
__host__ __device__ inline float relu_masked_by(float v, float mask_value) {
  return mask_value > 0.0f ? v : 0.0f;
}
__host__ __device__ inline float relu_masked(float v, const float* relu_mask, int64_t i) {
  return relu_masked_by(v, relu_mask_value(relu_mask, i));
}

// Whether p is 16-byte aligned (a float4 load, a 16-byte cp.async).
inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// Grid-stride loop: for (int64_t e = global_thread(); e < n; e += grid_stride()) ...
__device__ inline int64_t global_thread() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ inline int64_t grid_stride() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

#if defined(__CUDACC__) || defined(UNET_CPU_EMULATION)
// Launches `kernel` on `stream` with `smem` bytes of dynamic shared memory, then checks the launch.
template <typename... Params, typename... Args>
void launch_kernel_smem(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block,
                        size_t smem, cudaStream_t stream, Args... args) {
#ifdef UNET_CPU_EMULATION
  // tests/cpu_emulation runs the kernel on the CPU (tests/test_conv3x3_emulated.py).
  (void)stream;
  cpu_emulation::launch(kernel, grid, block, smem, static_cast<Params>(args)...);
#else
  kernel<<<grid, block, smem, stream>>>(static_cast<Params>(args)...);
#endif
  CHECK_LAUNCH(name);
}

// The kernels with static shared memory only.
template <typename... Params, typename... Args>
void launch_kernel(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block,
                   cudaStream_t stream, Args... args) {
  launch_kernel_smem(name, kernel, grid, block, 0, stream, args...);
}
#endif

}  // namespace unet
