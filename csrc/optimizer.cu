// optimizer.cu: SGD with momentum, Caffe's rule, in place.
//
// Layout: flat C-contiguous float32 buffers of n elements (a weight or a bias of any shape):
//   param     the parameter, updated in place
//   grad      its gradient (read only)
//   velocity  the momentum buffer, updated in place (zeros before the first step)
//   v = momentum * v + lr * (grad + weight_decay * param);  param -= v
//
// Kernels:
//   sgd_momentum_update_v1: one element per thread per grid-stride step.
#include "common.cuh"
#include "launchers.h"

namespace unet {

__global__ void sgd_momentum_update_v1(float* __restrict__ param, const float* __restrict__ grad,
                                       float* __restrict__ velocity, int64_t n, float lr,
                                       float momentum, float weight_decay) {
  for (int64_t e = global_thread(); e < n; e += grid_stride()) {
    const float p = param[e];
    const float v = momentum * velocity[e] + lr * (grad[e] + weight_decay * p);
    velocity[e] = v;
    param[e] = p - v;
  }
}

void launch_sgd_momentum_update(float* param, const float* grad, float* velocity, int64_t n,
                                float lr, float momentum, float weight_decay,
                                cudaStream_t stream) {
  if (n == 0) return;
  sgd_momentum_update_v1<<<grid_1d(n), kBlock1d, 0, stream>>>(param, grad, velocity, n, lr,
                                                               momentum, weight_decay);
  CHECK_LAUNCH("sgd_momentum_update_v1");
}

}  // namespace unet
