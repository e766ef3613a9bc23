// softmax_xent.cu: pixel-wise softmax over the K classes with weighted cross-entropy, the loss of
// the U-Net (the weight map w carries the class balance and the border weights).
//
// Layout (strides in elements, C-contiguous; HW = H*W pixels of a plane):
//   logits  [N, K, H, W]  float32     strides (K*HW, HW, W, 1): a pixel's K values lie HW apart
//   labels  [N, H, W]     int32       in [0, K); any other value makes the loss NaN
//   weights [N, H, W]     float32     the weight map
//   probs   [N, K, H, W]  float32     softmax of the logits (max-subtracted)
//   loss    one float32   sum over pixels of w * -log p[label], divided by N*H*W
//   dlogits [N, K, H, W]  float32     dloss * w * (p - onehot(label)) / (N*H*W); NaN at a pixel
//                                     with an illegal label
//
// The loss is reduced on the device in a fixed order, so it is bitwise reproducible: stage 1 gives
// each block a fixed, strided set of pixels and writes one partial sum per block (in double) to a
// workspace from the stream-ordered allocator; stage 2, one block, adds the partials in a fixed
// order. The number of blocks depends only on N*H*W, never on the device.
//
// Kernels:
//   softmax_xent_forward_v1_pixel: one thread per pixel per grid-stride step: max, sum of exp,
//     probs, and the pixel's term w * (log(sum) + max - logit[label]) = w * -log p[label];
//     one block sum per block into the workspace.
//   softmax_xent_forward_v1_finish: one block; fixed-order sum of the partials, divided by N*H*W.
//   softmax_xent_backward_v1: one thread per element of dlogits.
#include <cmath>

#include "common.cuh"
#include "launchers.h"
#include "reduce.cuh"

namespace unet {

// Stage 1 of the loss uses at most this many blocks (and so as many partial sums).
constexpr int kLossMaxBlocks = 1024;

__device__ inline bool label_is_legal(int32_t label, int K) { return label >= 0 && label < K; }

__global__ void softmax_xent_forward_v1_pixel(const float* __restrict__ logits,
                                              const int32_t* __restrict__ labels,
                                              const float* __restrict__ weights,
                                              float* __restrict__ probs,
                                              double* __restrict__ partials, int N, int K,
                                              int64_t HW) {
  __shared__ double scratch[kWarp];
  const int64_t pixels = static_cast<int64_t>(N) * HW;
  double acc = 0.0;
  for (int64_t e = global_thread(); e < pixels; e += grid_stride()) {
    const int64_t n = e / HW;
    const int64_t offset = n * K * HW + e % HW;  // element [n, 0, i, j]
    const float* z = logits + offset;
    float* p = probs + offset;
    float zmax = z[0];
    for (int k = 1; k < K; ++k) zmax = fmaxf(zmax, z[k * HW]);
    float sum = 0.0f;
    for (int k = 0; k < K; ++k) sum += expf(z[k * HW] - zmax);
    const float inv_sum = 1.0f / sum;
    for (int k = 0; k < K; ++k) p[k * HW] = expf(z[k * HW] - zmax) * inv_sum;
    const int32_t label = labels[e];
    const float nll = label_is_legal(label, K) ? logf(sum) + zmax - z[label * HW] : NAN;
    acc += static_cast<double>(weights[e]) * static_cast<double>(nll);
  }
  const double block_total = block_sum(acc, scratch);
  if (threadIdx.x == 0) partials[blockIdx.x] = block_total;
}

__global__ void softmax_xent_forward_v1_finish(const double* __restrict__ partials,
                                               int num_partials, double pixels,
                                               float* __restrict__ loss) {
  __shared__ double scratch[kWarp];
  double acc = 0.0;
  for (int k = threadIdx.x; k < num_partials; k += blockDim.x) acc += partials[k];
  const double total = block_sum(acc, scratch);
  if (threadIdx.x == 0) *loss = static_cast<float>(total / pixels);
}

__global__ void softmax_xent_backward_v1(const float* __restrict__ probs,
                                         const int32_t* __restrict__ labels,
                                         const float* __restrict__ weights,
                                         float* __restrict__ dlogits, float scale, int N, int K,
                                         int64_t HW) {
  const int64_t total = static_cast<int64_t>(N) * K * HW;
  for (int64_t e = global_thread(); e < total; e += grid_stride()) {
    const int64_t pix = e % HW;
    const int k = static_cast<int>((e / HW) % K);
    const int64_t n = e / (HW * K);
    const int64_t pixel = n * HW + pix;  // index into labels and weights
    const int32_t label = labels[pixel];
    if (!label_is_legal(label, K)) {
      dlogits[e] = NAN;
      continue;
    }
    const float onehot = k == label ? 1.0f : 0.0f;
    dlogits[e] = scale * weights[pixel] * (probs[e] - onehot);
  }
}

void launch_softmax_xent_forward(const float* logits, const int32_t* labels, const float* weights,
                                 float* loss, float* probs, int N, int K, int H, int W,
                                 cudaStream_t stream) {
  const char* op = "softmax_xent_forward";
  const int64_t HW = static_cast<int64_t>(H) * W;
  const int64_t pixels = static_cast<int64_t>(N) * HW;
  if (pixels == 0 || K == 0)
    throw std::runtime_error("softmax_xent_forward: needs at least one pixel and one class");
  const int64_t wanted = ceil_div<int64_t>(pixels, kReduceBlock);
  const int blocks = static_cast<int>(wanted < kLossMaxBlocks ? wanted : kLossMaxBlocks);

  double* partials = nullptr;
  CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&partials), blocks * sizeof(double), stream),
             op);
  softmax_xent_forward_v1_pixel<<<blocks, kReduceBlock, 0, stream>>>(logits, labels, weights,
                                                                     probs, partials, N, K, HW);
  cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) {
    softmax_xent_forward_v1_finish<<<1, kReduceBlock, 0, stream>>>(
        partials, blocks, static_cast<double>(pixels), loss);
    err = cudaGetLastError();
  }
  // Freed in stream order, after the finishing kernel has read the partials.
  const cudaError_t free_err = cudaFreeAsync(partials, stream);
  if (err != cudaSuccess)
    throw_cuda_error(err, "softmax_xent_forward_v1_pixel/finish", "launch", __FILE__, __LINE__);
  CUDA_CHECK(free_err, op);
}

void launch_softmax_xent_backward(const float* probs, const int32_t* labels, const float* weights,
                                  float* dlogits, float dloss, int N, int K, int H, int W,
                                  cudaStream_t stream) {
  const int64_t HW = static_cast<int64_t>(H) * W;
  const int64_t total = static_cast<int64_t>(N) * K * HW;
  if (total == 0) return;
  const float scale =
      static_cast<float>(static_cast<double>(dloss) / (static_cast<double>(N) * HW));
  softmax_xent_backward_v1<<<grid_1d(total), kBlock1d, 0, stream>>>(probs, labels, weights,
                                                                     dlogits, scale, N, K, HW);
  CHECK_LAUNCH("softmax_xent_backward_v1");
}

}  // namespace unet
