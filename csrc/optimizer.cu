// optimizer.cu: SGD with momentum, Caffe's rule, in place.
//
// Layout: flat C-contiguous float32 buffers of n elements (a weight or a bias of any shape):
//   param     the parameter, updated in place
//   grad      its gradient (read only)
//   velocity  the momentum buffer, updated in place (zeros before the first step)
//   v = momentum * v + lr * (grad + weight_decay * param);  param -= v
//
// The learning rate reaches the kernel in one of two ways, chosen by its launcher's caller:
//   * by value, as a kernel argument (`lr`, with lr_on_device == nullptr). The value is part of the
//     launch: a CUDA graph that captured the launch would replay it with that rate forever.
//   * by address (`lr_on_device`, a float32 in device memory). Every thread reads it when the
//     kernel runs, so a captured launch replays with whatever the host wrote there since; the
//     warm-up schedule changes the rate every step (unet_cuda/graph.py).
// Both forms run the same kernel and the same arithmetic, so the same float32 rate gives the same
// bits. momentum and weight_decay stay kernel arguments: they are constant during training.
//
// Kernels:
//   sgd_momentum_update_v1: one element per thread per grid-stride step; the rate comes from the
//     argument or, when lr_on_device is not null, from that device float.
//   sgd_momentum_update_multi_v1: the same update of many parameters in one launch (a training
//     step's 46 took 46 launches, 0.41 ms on an H100; the largest of them alone cannot fill the GPU
//     with the others waiting behind it). Up to kSgdTableSize (param, grad, velocity, n) are passed
//     by value in the kernel's argument; blockIdx.y picks one, so a block reads its pointers once,
//     the same for all its threads, and blockIdx.x / threadIdx.x stride over its elements.
//     The arithmetic is sgd_momentum_step, the same function as v1's: the same bits.
#include <algorithm>

#include "common.cuh"
#include "launchers.h"

namespace unet {

// One element of Caffe's rule, the arithmetic of both kernels.
__device__ __forceinline__ void sgd_momentum_step(float* param, const float* grad, float* velocity,
                                                  int64_t e, float rate, float momentum,
                                                  float weight_decay) {
  const float p = param[e];
  const float v = momentum * velocity[e] + rate * (grad[e] + weight_decay * p);
  velocity[e] = v;
  param[e] = p - v;
}

__global__ void sgd_momentum_update_v1(float* __restrict__ param, const float* __restrict__ grad,
                                       float* __restrict__ velocity, int64_t n, float lr,
                                       const float* __restrict__ lr_on_device, float momentum,
                                       float weight_decay) {
  // One read per thread, before the loop: the same 4 bytes for every thread (a broadcast).
  const float rate = lr_on_device != nullptr ? *lr_on_device : lr;
  for (int64_t e = global_thread(); e < n; e += grid_stride())
    sgd_momentum_step(param, grad, velocity, e, rate, momentum, weight_decay);
}

// Up to this many parameters per launch of sgd_momentum_update_multi_v1: 32 x 32 bytes of
// pointers and sizes, well inside a kernel's 4 KB of arguments.
constexpr int kSgdTableSize = 32;
// Blocks per parameter at most: eight per SM of an H100 (a full SM of 256-thread blocks), for the
// largest (b2's 9.4 M weights: 35 elements per thread); the surplus blocks of smaller parameters
// leave at once.
constexpr unsigned int kSgdMaxBlocksPerTensor = 1056;

struct SgdTensorTable {
  float* param[kSgdTableSize];
  const float* grad[kSgdTableSize];
  float* velocity[kSgdTableSize];
  int64_t n[kSgdTableSize];
};

__global__ void sgd_momentum_update_multi_v1(const SgdTensorTable table, float lr,
                                             const float* __restrict__ lr_on_device,
                                             float momentum, float weight_decay) {
  const int i = blockIdx.y;
  float* __restrict__ const param = table.param[i];
  const float* __restrict__ const grad = table.grad[i];
  float* __restrict__ const velocity = table.velocity[i];
  const int64_t n = table.n[i];
  const float rate = lr_on_device != nullptr ? *lr_on_device : lr;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x)
    sgd_momentum_step(param, grad, velocity, e, rate, momentum, weight_decay);
}

void launch_sgd_momentum_update(float* param, const float* grad, float* velocity, int64_t n,
                                float lr, const float* lr_on_device, float momentum,
                                float weight_decay, cudaStream_t stream) {
  if (n == 0) return;
  launch_kernel("sgd_momentum_update_v1", sgd_momentum_update_v1, dim3(grid_1d(n)),
                dim3(kBlock1d), stream, param, grad, velocity, n, lr, lr_on_device, momentum,
                weight_decay);
}

void launch_sgd_momentum_update_multi(float* const* params, const float* const* grads,
                                      float* const* velocities, const int64_t* sizes, int count,
                                      float lr, const float* lr_on_device, float momentum,
                                      float weight_decay, cudaStream_t stream) {
  for (int first = 0; first < count; first += kSgdTableSize) {
    const int k = std::min(kSgdTableSize, count - first);
    SgdTensorTable table{};
    int64_t largest = 0;
    for (int j = 0; j < k; ++j) {
      table.param[j] = params[first + j];
      table.grad[j] = grads[first + j];
      table.velocity[j] = velocities[first + j];
      table.n[j] = sizes[first + j];
      largest = std::max(largest, sizes[first + j]);
    }
    if (largest == 0) continue;
    const dim3 grid(std::min(grid_1d(largest), kSgdMaxBlocksPerTensor), static_cast<unsigned>(k));
    launch_kernel("sgd_momentum_update_multi_v1", sgd_momentum_update_multi_v1, grid,
                  dim3(kBlock1d), stream, table, lr, lr_on_device, momentum, weight_decay);
  }
}

}  // namespace unet
