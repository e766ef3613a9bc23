// conv1x1.cu: 1x1 convolution (the output layer: per pixel, a matrix-vector product over channels).
//
// Layout (strides in elements, all buffers C-contiguous float32; HW = H*W pixels of a plane):
//   x   [N, C, H, W]   input             strides (C*HW, HW, W, 1)
//   w   [O, C, 1, 1]   weights (OIHW)    element w[o, c] at o*C + c
//   b   [O]            bias
//   y   [N, O, H, W]   output            strides (O*HW, HW, W, 1)
//   dy  [N, O, H, W]   gradient of the output;  dx [N, C, H, W] gradient of the input
//   dw  [O, C, 1, 1], db [O]   gradients of the weights and the bias
//
// Kernels:
//   conv1x1_forward_v1_direct: one thread per output element y[n,o,p]; sums x[n,c,p] w[o,c] over c.
//   conv1x1_backward_data_v1_direct: one thread per input element dx[n,c,p]; sums
//     dy[n,o,p] w[o,c] over o.
//   conv1x1_backward_weight_v1_block_per_oc: one block per (o, c); each thread sums a fixed
//     strided share of the N*HW products dy[n,o,p] x[n,c,p], then one fixed-order block sum.
//     db comes from launch_bias_backward.
// and, where O <= kConv1x1MaxOut (the U-Net's output layer: one channel per class), what the
// launchers run instead:
//   conv1x1_forward_v2_pixel: one thread per pixel, its O sums in registers: x is read once
//     (v1 reads it once per output channel).
//   conv1x1_backward_data_v2_pixel: one thread per pixel: its O values of dy read once into
//     registers, then its C values of dx written (v1 reads dy again for every c).
//   conv1x1_backward_weight_v2_slices: block (c, s) sums x[n,c,p] dy[n,o,p] for every o over
//     slice s of the N*HW pixels (block (C, s): dy alone, the bias), one fixed-order block sum per
//     o into a workspace; conv1x1_backward_weight_v2_reduce adds the slices in order into dw and
//     db. v1's O*C blocks (128 for the output layer) each kept 256 threads' loads in flight, a
//     few GB/s per block; here (C+1) x S blocks fill the GPU. Deterministic: the slices and every
//     order of addition depend on the shapes only.
#include "common.cuh"
#include "launchers.h"
#include "reduce.cuh"
#include "workspace.cuh"

namespace unet {

// The output channels that the v2 kernels keep in registers per pixel.
constexpr int kConv1x1MaxOut = 8;
// The weight gradient's slices: about this many blocks in all (eight of 256 threads on each of an
// H100's 132 SMs; a constant, so that every GPU sums in the same order), each over at least
// kConv1x1MinSlicePixels pixels, at most kConv1x1MaxSlices slices.
constexpr int64_t kConv1x1TargetBlocks = 1056;
constexpr int64_t kConv1x1MinSlicePixels = 4096;
constexpr int64_t kConv1x1MaxSlices = 256;

__global__ void conv1x1_forward_v1_direct(const float* __restrict__ x, const float* __restrict__ w,
                                          const float* __restrict__ b, float* __restrict__ y,
                                          int N, int C, int64_t HW, int O) {
  const int64_t total = static_cast<int64_t>(N) * O * HW;
  for (int64_t e = global_thread(); e < total; e += grid_stride()) {
    const int64_t p = e % HW;
    const int o = static_cast<int>((e / HW) % O);
    const int64_t n = e / (HW * O);
    const float* xp = x + n * C * HW + p;            // x[n, 0, p]
    const float* wp = w + static_cast<int64_t>(o) * C;  // w[o, 0]
    float acc = b[o];
    for (int c = 0; c < C; ++c) acc += xp[c * HW] * wp[c];
    y[e] = acc;
  }
}

__global__ void conv1x1_backward_data_v1_direct(const float* __restrict__ dy,
                                                const float* __restrict__ w,
                                                const float* __restrict__ relu_mask,
                                                float* __restrict__ dx, int N, int C, int64_t HW,
                                                int O) {
  const int64_t total = static_cast<int64_t>(N) * C * HW;
  for (int64_t e = global_thread(); e < total; e += grid_stride()) {
    const int64_t p = e % HW;
    const int c = static_cast<int>((e / HW) % C);
    const int64_t n = e / (HW * C);
    const float* dyp = dy + n * O * HW + p;  // dy[n, 0, p]
    float acc = 0.0f;
    for (int o = 0; o < O; ++o) acc += dyp[o * HW] * w[static_cast<int64_t>(o) * C + c];
    dx[e] = relu_masked(acc, relu_mask, e);
  }
}

__global__ void conv1x1_backward_weight_v1_block_per_oc(const float* __restrict__ x,
                                                        const float* __restrict__ dy,
                                                        float* __restrict__ dw, int N, int C,
                                                        int64_t HW, int O) {
  __shared__ float scratch[kWarp];
  const int o = static_cast<int>(blockIdx.x / C);
  const int c = static_cast<int>(blockIdx.x % C);
  float acc = 0.0f;
  for (int n = 0; n < N; ++n) {
    const float* dyp = dy + (static_cast<int64_t>(n) * O + o) * HW;  // dy[n, o, 0]
    const float* xp = x + (static_cast<int64_t>(n) * C + c) * HW;    // x[n, c, 0]
    acc += strided_sum<kReduceIlp>(threadIdx.x, HW, blockDim.x,
                                   [&](int64_t p) { return dyp[p] * xp[p]; });
  }
  const float sum = block_sum(acc, scratch);
  if (threadIdx.x == 0) dw[blockIdx.x] = sum;
}

__global__ void conv1x1_forward_v2_pixel(const float* __restrict__ x, const float* __restrict__ w,
                                         const float* __restrict__ b, float* __restrict__ y, int N,
                                         int C, int64_t HW, int O) {
  const int64_t pixels = static_cast<int64_t>(N) * HW;
  for (int64_t e = global_thread(); e < pixels; e += grid_stride()) {
    const int64_t n = e / HW, p = e - n * HW;
    const float* xp = x + n * C * HW + p;  // x[n, 0, p]
    float acc[kConv1x1MaxOut];
#pragma unroll
    for (int o = 0; o < kConv1x1MaxOut; ++o) acc[o] = o < O ? b[o] : 0.0f;
#pragma unroll 4
    for (int c = 0; c < C; ++c) {
      const float v = xp[c * HW];
#pragma unroll
      for (int o = 0; o < kConv1x1MaxOut; ++o)
        if (o < O) acc[o] = fmaf(v, w[static_cast<int64_t>(o) * C + c], acc[o]);
    }
    float* yp = y + n * O * HW + p;  // y[n, 0, p]
#pragma unroll
    for (int o = 0; o < kConv1x1MaxOut; ++o)
      if (o < O) yp[o * HW] = acc[o];
  }
}

__global__ void conv1x1_backward_data_v2_pixel(const float* __restrict__ dy,
                                               const float* __restrict__ w,
                                               const float* __restrict__ relu_mask,
                                               float* __restrict__ dx, int N, int C, int64_t HW,
                                               int O) {
  const int64_t pixels = static_cast<int64_t>(N) * HW;
  for (int64_t e = global_thread(); e < pixels; e += grid_stride()) {
    const int64_t n = e / HW, p = e - n * HW;
    const float* dyp = dy + n * O * HW + p;  // dy[n, 0, p]
    float g[kConv1x1MaxOut];
#pragma unroll
    for (int o = 0; o < kConv1x1MaxOut; ++o) g[o] = o < O ? dyp[o * HW] : 0.0f;
    float* dxp = dx + n * C * HW + p;  // dx[n, 0, p]
    const float* mp = relu_mask ? relu_mask + n * C * HW + p : nullptr;
#pragma unroll 4
    for (int c = 0; c < C; ++c) {
      float acc = 0.0f;
#pragma unroll
      for (int o = 0; o < kConv1x1MaxOut; ++o)
        if (o < O) acc = fmaf(g[o], w[static_cast<int64_t>(o) * C + c], acc);
      dxp[c * HW] = relu_masked(acc, mp, c * HW);
    }
  }
}

// Slice s of S of the N*HW pixels (for_each_slice_image).
__global__ void __launch_bounds__(kReduceBlock)
conv1x1_backward_weight_v2_slices(const float* __restrict__ x, const float* __restrict__ dy,
                                  float* __restrict__ part, int N, int C, int64_t HW, int O,
                                  int slices) {
  __shared__ float scratch[kWarp];
  const int c = blockIdx.x;  // C: the bias (dy alone)
  const int s = blockIdx.y;
  float acc[kConv1x1MaxOut];
#pragma unroll
  for (int o = 0; o < kConv1x1MaxOut; ++o) acc[o] = 0.0f;
  for_each_slice_image(N, HW, s, slices, [&](int64_t n, int64_t p_begin, int64_t p_end) {
    const float* xp = c < C ? x + (n * C + c) * HW : nullptr;  // x[n, c, 0]
    const float* dyp = dy + n * O * HW;                        // dy[n, 0, 0]
#pragma unroll 4
    for (int64_t p = p_begin + threadIdx.x; p < p_end; p += blockDim.x) {
      const float v = xp != nullptr ? xp[p] : 1.0f;
#pragma unroll
      for (int o = 0; o < kConv1x1MaxOut; ++o)
        if (o < O) acc[o] = fmaf(dyp[o * HW + p], v, acc[o]);
    }
  });
  for (int o = 0; o < O; ++o) {  // O <= kConv1x1MaxOut; block_sum synchronises: no early exit
    float v = 0.0f;
#pragma unroll
    for (int i = 0; i < kConv1x1MaxOut; ++i)
      if (i == o) v = acc[i];
    const float sum = block_sum(v, scratch);
    if (threadIdx.x == 0) part[(static_cast<int64_t>(s) * O + o) * (C + 1) + c] = sum;
  }
}

// dw[o, c] (c < C) and db[o] (c = C) = the sum of part[s, o, c] over s = 0 .. S-1, in that order.
__global__ void conv1x1_backward_weight_v2_reduce(const float* __restrict__ part,
                                                  float* __restrict__ dw, float* __restrict__ db,
                                                  int C, int O, int slices) {
  const int64_t count = static_cast<int64_t>(O) * (C + 1);
  for (int64_t e = global_thread(); e < count; e += grid_stride()) {
    float sum = part[e];
    for (int s = 1; s < slices; ++s) sum += part[s * count + e];
    const int o = static_cast<int>(e / (C + 1)), c = static_cast<int>(e - o * int64_t{C + 1});
    if (c < C) dw[static_cast<int64_t>(o) * C + c] = sum;
    else db[o] = sum;
  }
}

// The slices of conv1x1_backward_weight_v2_slices, from the shapes alone.
int conv1x1_weight_slices(int N, int C, int64_t HW) {
  return pixel_slices(static_cast<int64_t>(C) + 1, static_cast<int64_t>(N) * HW, kConv1x1TargetBlocks,
                      kConv1x1MinSlicePixels, kConv1x1MaxSlices);
}

void launch_conv1x1_forward(const float* x, const float* w, const float* b, float* y, int N, int C,
                            int H, int W, int O, cudaStream_t stream) {
  const int64_t HW = static_cast<int64_t>(H) * W;
  const int64_t pixels = static_cast<int64_t>(N) * HW;
  if (pixels == 0 || O == 0) return;
  if (O <= kConv1x1MaxOut) {
    launch_kernel("conv1x1_forward_v2_pixel", conv1x1_forward_v2_pixel, dim3(grid_1d(pixels)),
                  dim3(kBlock1d), stream, x, w, b, y, N, C, HW, O);
    return;
  }
  launch_kernel("conv1x1_forward_v1_direct", conv1x1_forward_v1_direct, dim3(grid_1d(pixels * O)),
                dim3(kBlock1d), stream, x, w, b, y, N, C, HW, O);
}

void launch_conv1x1_backward_data(const float* dy, const float* w, const float* relu_mask,
                                  float* dx, int N, int C, int H, int W, int O,
                                  cudaStream_t stream) {
  const int64_t HW = static_cast<int64_t>(H) * W;
  const int64_t pixels = static_cast<int64_t>(N) * HW;
  if (pixels == 0 || C == 0) return;
  if (O <= kConv1x1MaxOut) {
    launch_kernel("conv1x1_backward_data_v2_pixel", conv1x1_backward_data_v2_pixel,
                  dim3(grid_1d(pixels)), dim3(kBlock1d), stream, dy, w, relu_mask, dx, N, C, HW,
                  O);
    return;
  }
  launch_kernel("conv1x1_backward_data_v1_direct", conv1x1_backward_data_v1_direct,
                dim3(grid_1d(pixels * C)), dim3(kBlock1d), stream, dy, w, relu_mask, dx, N, C, HW,
                O);
}

void launch_conv1x1_backward_weight(const float* x, const float* dy, float* dw, float* db, int N,
                                    int C, int H, int W, int O, cudaStream_t stream) {
  const char* op = "conv1x1_backward_weight";
  const int64_t HW = static_cast<int64_t>(H) * W;
  if (O == 0) return;
  if (O <= kConv1x1MaxOut) {
    const int slices = conv1x1_weight_slices(N, C, HW);
    const int64_t count = static_cast<int64_t>(O) * (C + 1);
    if (static_cast<int64_t>(C) + 1 > INT32_MAX)
      throw std::runtime_error(std::string(op) + ": C = " + std::to_string(C) + " exceeds the grid limit");
    // freed in stream order, after the reduction has read the slices
    const Workspace part(slices * count, stream, op);
    launch_kernel("conv1x1_backward_weight_v2_slices", conv1x1_backward_weight_v2_slices,
                  dim3(static_cast<unsigned>(C + 1), static_cast<unsigned>(slices)),
                  dim3(kReduceBlock), stream, x, dy, part.data(), N, C, HW, O, slices);
    launch_kernel("conv1x1_backward_weight_v2_reduce", conv1x1_backward_weight_v2_reduce,
                  dim3(grid_1d(count)), dim3(kBlock1d), stream,
                  static_cast<const float*>(part.data()), dw, db, C, O, slices);
    return;
  }
  const int64_t blocks = static_cast<int64_t>(O) * C;
  if (blocks > 0) {
    if (blocks > INT32_MAX)
      throw std::runtime_error("conv1x1_backward_weight: O*C = " + std::to_string(blocks) +
                               " exceeds the grid limit");
    launch_kernel("conv1x1_backward_weight_v1_block_per_oc", conv1x1_backward_weight_v1_block_per_oc,
                  dim3(static_cast<unsigned>(blocks)), dim3(kReduceBlock), stream, x, dy, dw, N, C,
                  HW, O);
  }
  launch_bias_backward(dy, db, N, O, HW, stream);
}

}  // namespace unet
