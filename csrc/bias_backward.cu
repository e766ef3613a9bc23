// bias_backward.cu: the bias gradient of every convolution (3x3, 1x1, 2x2 up-convolution).
//
// Layout: dy [N, O, HW] C-contiguous float32 (any NCHW gradient seen with its pixels flattened,
// strides (O*HW, HW, 1)); db [O].
//   db[o] = sum over n and p of dy[n, o, p]
//
// Kernels:
//   bias_backward_v1_block_per_channel: one block per o; each thread adds a fixed strided share of
//     the N*HW values, then one fixed-order block sum (deterministic, no atomics).
#include "common.cuh"
#include "launchers.h"
#include "reduce.cuh"

namespace unet {

__global__ void bias_backward_v1_block_per_channel(const float* __restrict__ dy,
                                                   float* __restrict__ db, int N, int O,
                                                   int64_t HW) {
  __shared__ float scratch[kWarp];
  const int o = blockIdx.x;
  float acc = 0.0f;
  for (int n = 0; n < N; ++n) {
    const float* dyp = dy + (static_cast<int64_t>(n) * O + o) * HW;  // dy[n, o, 0]
    for (int64_t p = threadIdx.x; p < HW; p += blockDim.x) acc += dyp[p];
  }
  const float sum = block_sum(acc, scratch);
  if (threadIdx.x == 0) db[o] = sum;
}

void launch_bias_backward(const float* dy, float* db, int N, int O, int64_t HW,
                          cudaStream_t stream) {
  if (O == 0) return;
  bias_backward_v1_block_per_channel<<<O, kReduceBlock, 0, stream>>>(dy, db, N, O, HW);
  CHECK_LAUNCH("bias_backward_v1_block_per_channel");
}

}  // namespace unet
