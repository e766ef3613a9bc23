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
#include "common.cuh"
#include "launchers.h"

namespace unet {

__global__ void sgd_momentum_update_v1(float* __restrict__ param, const float* __restrict__ grad,
                                       float* __restrict__ velocity, int64_t n, float lr,
                                       const float* __restrict__ lr_on_device, float momentum,
                                       float weight_decay) {
  // One read per thread, before the loop: the same 4 bytes for every thread (a broadcast).
  const float rate = lr_on_device != nullptr ? *lr_on_device : lr;
  for (int64_t e = global_thread(); e < n; e += grid_stride()) {
    const float p = param[e];
    const float v = momentum * velocity[e] + rate * (grad[e] + weight_decay * p);
    velocity[e] = v;
    param[e] = p - v;
  }
}

void launch_sgd_momentum_update(float* param, const float* grad, float* velocity, int64_t n,
                                float lr, const float* lr_on_device, float momentum,
                                float weight_decay, cudaStream_t stream) {
  if (n == 0) return;
  sgd_momentum_update_v1<<<grid_1d(n), kBlock1d, 0, stream>>>(param, grad, velocity, n, lr,
                                                               lr_on_device, momentum,
                                                               weight_decay);
  CHECK_LAUNCH("sgd_momentum_update_v1");
}

}  // namespace unet
