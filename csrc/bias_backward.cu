// bias_backward.cu: the bias gradient of every convolution (3x3, 1x1, 2x2 up-convolution).
//
// Layout: dy [N, O, HW] C-contiguous float32 (any NCHW gradient seen with its pixels flattened,
// strides (O*HW, HW, 1)); db [O].
//   db[o] = sum over n and p of dy[n, o, p]
//
// Kernels:
//   bias_backward_v2_block_per_channel: one block of kWideReduceBlock threads per o; each thread
//     adds a fixed strided share of every image's HW values in kReduceIlp independent partial sums
//     (strided_sum: that many loads in flight), then one fixed-order block sum (deterministic, no
//     atomics). (v1 kept one running sum per thread: one memory latency per element, about 0.4 ms
//     for a 568x568 layer on an H200.)
#include "common.cuh"
#include "launchers.h"
#include "reduce.cuh"

namespace unet {

__global__ void __launch_bounds__(kWideReduceBlock)
bias_backward_v2_block_per_channel(const float* __restrict__ dy, float* __restrict__ db, int N,
                                   int O, int64_t HW) {
  __shared__ float scratch[kWarp];
  const int o = blockIdx.x;
  float acc = 0.0f;
  for (int n = 0; n < N; ++n) {
    const float* dyp = dy + (static_cast<int64_t>(n) * O + o) * HW;  // dy[n, o, 0]
    acc += strided_sum<kReduceIlp>(threadIdx.x, HW, blockDim.x, [&](int64_t p) { return dyp[p]; });
  }
  const float sum = block_sum(acc, scratch);
  if (threadIdx.x == 0) db[o] = sum;
}

void launch_bias_backward(const float* dy, float* db, int N, int O, int64_t HW,
                          cudaStream_t stream) {
  if (O == 0) return;
  launch_kernel("bias_backward_v2_block_per_channel", bias_backward_v2_block_per_channel, dim3(O),
                dim3(kWideReduceBlock), stream, dy, db, N, O, HW);
}

}  // namespace unet
