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
//     for a 568x568 layer on an H200.) Where O blocks alone leave most SMs idle (the 64-channel
//     layers: 64 blocks for 20 million values), the launcher takes v3 instead.
//   bias_backward_v3_slices: blocks (o, s) over slice s of the N*HW pixels, one fixed-order block
//     sum each into a workspace [S, O]; bias_backward_v3_reduce adds the slices in order. S from
//     the shapes alone (bias_slices), so every GPU sums in the same order.
#include "common.cuh"
#include "launchers.h"
#include "reduce.cuh"
#include "workspace.cuh"

namespace unet {

// v3's slices: about this many blocks in all (eight of 256 threads on each of an H100's 132 SMs; a
// constant, so that the order of the sums never depends on the GPU), each over at least
// kBiasMinSlicePixels pixels, at most kBiasMaxSlices slices.
constexpr int64_t kBiasTargetBlocks = 1056;
constexpr int64_t kBiasMinSlicePixels = 8192;
constexpr int64_t kBiasMaxSlices = 64;

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

// Block (o, s): slice s of the N*HW pixels (for_each_slice_image).
__global__ void __launch_bounds__(kReduceBlock)
bias_backward_v3_slices(const float* __restrict__ dy, float* __restrict__ part, int N, int O,
                        int64_t HW, int slices) {
  __shared__ float scratch[kWarp];
  const int o = blockIdx.x, s = blockIdx.y;
  float acc = 0.0f;
  for_each_slice_image(N, HW, s, slices, [&](int64_t n, int64_t p_begin, int64_t p_end) {
    const float* dyp = dy + (n * O + o) * HW;  // dy[n, o, 0]
    acc += strided_sum<kReduceIlp>(p_begin + threadIdx.x, p_end, blockDim.x,
                                   [&](int64_t p) { return dyp[p]; });
  });
  const float sum = block_sum(acc, scratch);
  if (threadIdx.x == 0) part[static_cast<int64_t>(s) * O + o] = sum;
}

// db[o] = the sum of part[s, o] over s = 0 .. S-1, in that order.
__global__ void bias_backward_v3_reduce(const float* __restrict__ part, float* __restrict__ db,
                                        int O, int slices) {
  for (int64_t o = global_thread(); o < O; o += grid_stride()) {
    float sum = part[o];
    for (int s = 1; s < slices; ++s) sum += part[static_cast<int64_t>(s) * O + o];
    db[o] = sum;
  }
}

int bias_slices(int N, int O, int64_t HW) {
  return pixel_slices(O, static_cast<int64_t>(N) * HW, kBiasTargetBlocks, kBiasMinSlicePixels,
                      kBiasMaxSlices);
}

void launch_bias_backward(const float* dy, float* db, int N, int O, int64_t HW,
                          cudaStream_t stream) {
  if (O == 0) return;
  const int slices = bias_slices(N, O, HW);
  if (slices == 1) {
    launch_kernel("bias_backward_v2_block_per_channel", bias_backward_v2_block_per_channel, dim3(O),
                  dim3(kWideReduceBlock), stream, dy, db, N, O, HW);
    return;
  }
  // freed in stream order, after the reduction has read the slices
  const Workspace part(static_cast<int64_t>(slices) * O, stream, "bias_backward");
  launch_kernel("bias_backward_v3_slices", bias_backward_v3_slices,
                dim3(static_cast<unsigned>(O), static_cast<unsigned>(slices)), dim3(kReduceBlock),
                stream, dy, part.data(), N, O, HW, slices);
  launch_kernel("bias_backward_v3_reduce", bias_backward_v3_reduce, dim3(grid_1d(O)),
                dim3(kBlock1d), stream, static_cast<const float*>(part.data()), db, O, slices);
}

}  // namespace unet
