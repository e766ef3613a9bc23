// implicit_gemm.cuh: the implicit-GEMM engine that the 3x3 convolution (conv3x3.cu) and the 2x2
// up-convolution (upconv.cu) share: kernels v3-v6, their tiles, copies and pipelines, split-K, and
// the launch plumbing (tile choice, split plan, workspace, grid limits).
//
// An op is a set of GEMM *views*: small structs that say where A[m, k] and B[k, n] live in the op's
// tensors and where C[m, n] goes (the interface is described below, before TileCopy). The kernels
// never see a tensor shape; conv3x3.cu's views are the im2col of a 3x3 window, upconv.cu's the
// four taps of a 2x2 stride-2 transposed convolution. The versions (launchers.h registry):
//   v3_igemm       FP32 FFMA, 8x8 outputs per thread, double-buffered shared tiles
//   v4_tf32_mma    TF32 mma.sync.m16n8k8, cp.async double buffer
//   v5_bf16_mma    bf16 mma.sync.m16n8k16, a 4-stage cp.async pipeline in dynamic shared memory
//   v6_tf32_wgmma  Hopper (sm_90a) wgmma.mma_async from shared-memory descriptors, v5's pipeline
// (docs/CONV3X3.md explains each; the measured speeds are in the README).
//
// Everything here is a template, inline, or in an anonymous namespace: each .cu that includes this
// file instantiates the kernels of its own views.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "common.cuh"
#include "launchers.h"
#include "workspace.cuh"

namespace unet {

// =================================================================================================
// Shared pieces: the instructions written in PTX, the split-K partition (kernels are launched with
// common.cuh's launch_kernel)
// =================================================================================================

#ifdef UNET_CPU_EMULATION
using cpu_emulation::cp_async_16;
using cpu_emulation::cp_async_16_or_zero;
using cpu_emulation::cp_async_4;
using cpu_emulation::cp_async_4_or_zero;
using cpu_emulation::cp_async_commit;
using cpu_emulation::cp_async_wait;
using cpu_emulation::fence_proxy_async;
using cpu_emulation::mma_bf16_m16n8k16;
using cpu_emulation::mma_tf32_m16n8k8;
using cpu_emulation::pack_bf16x2;
using cpu_emulation::shared_address;
using cpu_emulation::to_tf32;
using cpu_emulation::wgmma_commit;
using cpu_emulation::wgmma_fence;
using cpu_emulation::wgmma_fence_operands;
using cpu_emulation::wgmma_bf16;
using cpu_emulation::wgmma_tf32;
using cpu_emulation::wgmma_wait;
#else
// x rounded to TF32 (round to nearest, ties away from zero), as the tensor cores read it.
__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}

// d += a b for a 16x8 tile d, a 16x8 (m x k) and b 8x8 (k x n), spread over the 32 lanes of a
// warp (PTX ISA, "Matrix Fragments for mma.m16n8k8", .tf32): with g = lane / 4, t = lane % 4,
//   a = {A[g][t], A[g+8][t], A[g][t+4], A[g+8][t+4]},  b = {B[t][g], B[t+4][g]},
//   d = {D[g][2t], D[g][2t+1], D[g+8][2t], D[g+8][2t+1]}.
__device__ __forceinline__ void mma_tf32_m16n8k8(float (&d)[4], const uint32_t (&a)[4],
                                                 const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Two floats rounded to bf16 (round to nearest even) and packed into one register: `lo` in the
// low 16 bits, `hi` in the high ones (cvt puts its first source in the high half).
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  uint32_t r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

// d += a b for a 16x8 tile d, a 16x16 (m x k) and b 16x8 (k x n) in bf16, FP32 accumulators (PTX
// ISA, "Matrix Fragments for mma.m16n8k16", .bf16). Each register holds two bf16 of consecutive
// k, the lower k in the low half; with g = lane / 4, t = lane % 4:
//   a = {A[g][2t..2t+1], A[g+8][2t..2t+1], A[g][2t+8..2t+9], A[g+8][2t+8..2t+9]},
//   b = {B[2t..2t+1][g], B[2t+8..2t+9][g]},  d as in mma.m16n8k8.
__device__ __forceinline__ void mma_bf16_m16n8k16(float (&d)[4], const uint32_t (&a)[4],
                                                  const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Asynchronous copies global -> shared (sm_80+): issued now, complete at cp_async_wait.
__device__ __forceinline__ void cp_async_4(float* dst, const float* src) {
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(d), "l"(src));
}
// 16 bytes: dst and src 16-byte aligned.
__device__ __forceinline__ void cp_async_16(float* dst, const float* src) {
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(d), "l"(src));
}
// The same with a source size: `copy` false copies no byte and fills dst with zeros (the
// zero-filling form of cp.async: no branch around the copy, no separate store of the zero).
__device__ __forceinline__ void cp_async_4_or_zero(float* dst, const float* src, bool copy) {
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(d), "l"(src), "r"(copy ? 4 : 0));
}
__device__ __forceinline__ void cp_async_16_or_zero(float* dst, const float* src, bool copy) {
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(d), "l"(src), "r"(copy ? 16 : 0));
}
// Closes the group of the copies issued since the last commit.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
// Waits until at most `kPending` committed groups are still in flight (this thread's copies).
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(kPending));
}

// ---- Hopper's warpgroup MMA (sm_90a only; UNET_WGMMA where this compilation targets it) ----
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define UNET_WGMMA 1
#endif

// The address of p in the shared-memory window (what matrix descriptors hold).
__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Orders this thread's earlier register writes before the wgmma that reads those registers.
__device__ __forceinline__ void wgmma_fence() {
#ifdef UNET_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

// Makes this thread's writes to shared memory (st.shared, cp.async) visible to the async proxy
// that wgmma reads shared memory through; a barrier then publishes them to the warpgroup.
__device__ __forceinline__ void fence_proxy_async() {
#ifdef UNET_WGMMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// Keeps the compiler from moving accesses to the accumulators across the asynchronous products
// that write them (an empty asm that "reads and writes" every register of the array).
template <int R>
__device__ __forceinline__ void wgmma_fence_operands(float (&d)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// Closes the group of the wgmma issued since the last commit.
__device__ __forceinline__ void wgmma_commit() {
#ifdef UNET_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}

// Waits until at most kPending committed wgmma groups are in flight.
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
#ifdef UNET_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
#endif
}

// D (64 x N, FP32, in registers) = A (64 x 8) B (8 x N) + (accumulate ? D : 0), A and B TF32 in
// shared memory described by desc_a and desc_b (K-major, unswizzled), over the 128 threads of a
// warpgroup (PTX ISA, "wgmma.mma_async", .m64nNk8 .tf32). Register 4j + 2v + q of the thread
// (warp w, lane 4g + t) holds D[16w + g + 8v][8j + 2t + q]. The tensor core reads the upper 19
// bits of each float32 (TF32 by truncation).
template <int N>
__device__ __forceinline__ void wgmma_tf32(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b,
                                           bool accumulate);
template <>
__device__ __forceinline__ void wgmma_tf32<64>(float (&d)[32], uint64_t desc_a, uint64_t desc_b,
                                                bool accumulate) {
#ifdef UNET_WGMMA
  asm volatile(
      "{\n.reg .pred p;\n"
      "setp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k8.f32.tf32.tf32 "
      "{"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
      "}, %32, %33, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(desc_a), "l"(desc_b), "r"(static_cast<int>(accumulate)));
#else
  (void)d, (void)desc_a, (void)desc_b, (void)accumulate;
  __trap();  // never launched: launch_v6 checks that this build holds sm_90a code
#endif
}

// The 96-column product of the 64 x 192 weight-gradient tile (each warpgroup owns 96 columns).
template <>
__device__ __forceinline__ void wgmma_tf32<96>(float (&d)[48], uint64_t desc_a, uint64_t desc_b,
                                               bool accumulate) {
#ifdef UNET_WGMMA
  asm volatile(
      "{\n.reg .pred p;\n"
      "setp.ne.b32 p, %50, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n96k8.f32.tf32.tf32 "
      "{"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47"
      "}, %48, %49, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47])
      : "l"(desc_a), "l"(desc_b), "r"(static_cast<int>(accumulate)));
#else
  (void)d, (void)desc_a, (void)desc_b, (void)accumulate;
  __trap();  // never launched: launch_v6 checks that this build holds sm_90a code
#endif
}

template <>
__device__ __forceinline__ void wgmma_tf32<128>(float (&d)[64], uint64_t desc_a, uint64_t desc_b,
                                                bool accumulate) {
#ifdef UNET_WGMMA
  asm volatile(
      "{\n.reg .pred p;\n"
      "setp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k8.f32.tf32.tf32 "
      "{"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
      "}, %64, %65, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(desc_a), "l"(desc_b), "r"(static_cast<int>(accumulate)));
#else
  (void)d, (void)desc_a, (void)desc_b, (void)accumulate;
  __trap();  // never launched: launch_v6 checks that this build holds sm_90a code
#endif
}

// The same with bf16 operands (v8, conv3x3_halo.cuh): A (64 x 16) B (16 x N), .m64nNk16 .bf16,
// K-major (no transpose), FP32 sums; D's registers as above. Each 16-byte row of a core matrix
// holds 8 bf16 of k.
template <int N>
__device__ __forceinline__ void wgmma_bf16(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b,
                                           bool accumulate);
template <>
__device__ __forceinline__ void wgmma_bf16<64>(float (&d)[32], uint64_t desc_a, uint64_t desc_b,
                                                bool accumulate) {
#ifdef UNET_WGMMA
  asm volatile(
      "{\n.reg .pred p;\n"
      "setp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
      "}, %32, %33, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(desc_a), "l"(desc_b), "r"(static_cast<int>(accumulate)));
#else
  (void)d, (void)desc_a, (void)desc_b, (void)accumulate;
  __trap();  // never launched: the v8 launcher checks that this build holds sm_90a code
#endif
}

template <>
__device__ __forceinline__ void wgmma_bf16<128>(float (&d)[64], uint64_t desc_a, uint64_t desc_b,
                                                bool accumulate) {
#ifdef UNET_WGMMA
  asm volatile(
      "{\n.reg .pred p;\n"
      "setp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
      "}, %64, %65, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(desc_a), "l"(desc_b), "r"(static_cast<int>(accumulate)));
#else
  (void)d, (void)desc_a, (void)desc_b, (void)accumulate;
  __trap();  // never launched: the v8 launcher checks that this build holds sm_90a code
#endif
}
#endif

// Slice `split` of `splits` of the range [0, units): balanced, in order, covering every unit.
__host__ __device__ inline void split_range(int64_t units, int split, int splits, int64_t& begin,
                                            int64_t& end) {
  begin = units * split / splits;
  end = units * (split + 1) / splits;
}

// =================================================================================================
// GEMM views: what every kernel below asks of the op it computes. A view has the fields M (rows of
// C), cols (columns of C) and, for run_output_gemm, K; and it answers:
//   k_tiles(bk)           how many bk-deep slices of K there are,
//   k_pos(tile, bk, kk)   what the kk-th k of slice `tile` is (decoded once, used by A and B),
//   a_row(m) / b_row(n)   what a row of A (an m) or of B^T (an n) is, decoded once per thread,
//   a_src / b_src         the address of A[m, k] / B[k, n], or nullptr where the element is zero
//                         (past M, N or K, or outside dy in the backward-data view),
//   c_row(m), store(...)  where C[m, n] goes, with the epilogue (bias, ReLU) applied.
// The views: conv3x3.cu (Conv3x3*Gemm, three directions and their concatenated twins) and
// upconv.cu (Upconv2x2*Gemm).
// kARowsContiguous / kBRowsContiguous: consecutive m (n) are consecutive in memory, so the copy
// of a tile gives consecutive threads consecutive rows; otherwise consecutive k are (the weights;
// the pixels of the weight-gradient view), and consecutive threads take consecutive k.
// kVecA / kVecB: four consecutive k of A (B) can be contiguous and 16-byte aligned, so that v4
// and v5 may copy them at once (the launcher checks the sizes and the pointer).
// =================================================================================================


// Which element of a ROWS x BK operand tile the r-th copy of a thread moves, THREADS threads
// copying VEC consecutive k at a time (see kARowsContiguous above). Both forms keep a thread's row
// (ROW_FAST) or its k (otherwise) the same for all its copies, so it is decoded once.
template <int ROWS, int BK, int THREADS, bool ROW_FAST, int VEC = 1>
struct TileCopy {
  static_assert(!ROW_FAST || VEC == 1, "vector copies run along k");
  static_assert(ROW_FAST ? THREADS % ROWS == 0 : THREADS % (BK / VEC) == 0,
                "each thread keeps one row (or one k) for all its copies");
  static constexpr int kThreads = THREADS;
  static constexpr int kPerThread = ROWS * BK / (VEC * THREADS);
  static_assert(kPerThread * VEC * THREADS == ROWS * BK, "the tile splits evenly over the threads");
  static constexpr int kStep = ROW_FAST ? THREADS / ROWS : THREADS / (BK / VEC);
  // The distinct rows of a thread ("slots"): ROW_FAST, one for all its copies; else one per copy.
  static constexpr int kRowSlots = ROW_FAST ? 1 : kPerThread;
  __host__ __device__ static constexpr int row_slot(int r) { return ROW_FAST ? 0 : r; }
  // Its distinct k ("k slots"): one per copy when ROW_FAST; else one for all.
  static constexpr int kKSlots = ROW_FAST ? kPerThread : 1;
  __host__ __device__ static constexpr int k_slot(int r) { return ROW_FAST ? r : 0; }
  __host__ __device__ static constexpr int row(int tid, int r) {
    return ROW_FAST ? tid % ROWS : tid / (BK / VEC) + r * kStep;
  }
  __host__ __device__ static constexpr int k(int tid, int r) {
    return ROW_FAST ? tid / ROWS + r * kStep : (tid % (BK / VEC)) * VEC;
  }
};

// Where a copy reads, and whether it reads at all (else it zero-fills): `p` is valid memory even
// where the element is zero (the view clamps it into its tensor), so that the zero-filling
// cp.async takes it as it is, with no test of the copy's own.
struct CopySource {
  const float* p;  // dereferenceable: the element, or somewhere inside the same tensor
  bool valid;      // false: the element is zero
};

// A tap-major view (IsTapMajor: one that has k_tile; conv3x3.cu) answers per tile
// k_tile(tile, bk), then per row of A (B) a_tile (b_tile): a CopySource for the row's first k of
// the tile, whose k-th element lies k * a_k_step(tile) further (B: k further), dereferenceable for
// every k of the tile; `valid` false where the row reads nothing (past M or the columns, or outside
// dy in the backward data).
//
// Any other view answers a_src / b_src (the element's address, or nullptr where it is zero), or
// a_copy(row, kpos) / b_copy(row, kpos) in their place: CopySources (the weight gradients, whose
// copies are the most numerous).
template <class Gemm, class = void>
struct AnswersCopySources : std::false_type {};
template <class Gemm>
struct AnswersCopySources<Gemm, std::void_t<decltype(&Gemm::a_copy), decltype(&Gemm::b_copy)>>
    : std::true_type {};
template <class Gemm, class = void>
struct IsTapMajor : std::false_type {};
template <class Gemm>
struct IsTapMajor<Gemm, std::void_t<decltype(&Gemm::k_tile)>> : std::true_type {};

namespace {
// A valid, 16-byte aligned global address for the zero-filling copies that read nothing.
__device__ __align__(16) float kZeroSource[4] = {0.0f, 0.0f, 0.0f, 0.0f};
}  // namespace

// p, through an empty asm: the compiler cannot fold the arithmetic that made it into what is done
// with it next.
__device__ __forceinline__ const float* opaque_pointer(const float* p) {
#ifndef UNET_CPU_EMULATION
  asm("" : "+l"(p));
#endif
  return p;
}

// The element (row, k position) of A (B) as a CopySource, whichever of the two the view answers:
// a null a_src / b_src becomes kZeroSource, not read. What the kernels ask of a non-tap-major view.
template <class Gemm>
__device__ __forceinline__ CopySource a_source(const Gemm& g, const typename Gemm::ARow& r,
                                               const typename Gemm::KPos& kp) {
  if constexpr (AnswersCopySources<Gemm>::value) {
    return g.a_copy(r, kp);
  } else {
    const float* p = g.a_src(r, kp);
    return {p ? p : kZeroSource, p != nullptr};
  }
}
template <class Gemm>
__device__ __forceinline__ CopySource b_source(const Gemm& g, const typename Gemm::BRow& r,
                                               const typename Gemm::KPos& kp) {
  if constexpr (AnswersCopySources<Gemm>::value) {
    return g.b_copy(r, kp);
  } else {
    const float* p = g.b_src(r, kp);
    return {p ? p : kZeroSource, p != nullptr};
  }
}

// Where flat pixel index m = (n, i, j) of images of rows x cols pixels lies: the image, the row and
// the column, and the pixel within its image (i * cols + j). What the views' a_row and c_row start
// from.
struct PixelIndex {
  int64_t n;
  int pix, i, j;
};
__device__ inline PixelIndex pixel_index(int64_t m, int rows, int cols) {
  const int64_t plane = static_cast<int64_t>(rows) * cols;
  const int64_t n = m / plane;
  const int pix = static_cast<int>(m - n * plane), i = pix / cols;
  return {n, pix, i, pix - i * cols};
}

// Thread-block slice of the split-K partition: slices of K tiles [begin, end) for blockIdx.z.
__device__ inline void k_tile_range(int64_t tiles, int64_t& begin, int64_t& end) {
  split_range(tiles, blockIdx.z, gridDim.z, begin, end);
}

// =================================================================================================
// v3: register-blocked implicit GEMM on the CUDA cores (FP32 FFMA)
// =================================================================================================

// Tile of a block: BM x BN outputs, TM x TN per thread (kept in registers), BK of K per step.
// A thread's TM rows are TM / 4 runs of 4, BM / (TM / 4) rows apart (row(tr, i)): its reads of A
// from shared memory are 16-byte loads of 4 rows, and the 8 threads of a quarter warp (consecutive
// tr) read 8 consecutive runs, 128 bytes on 32 distinct banks. With one run of TM = 8 rows per
// thread, threads tr and tr + 4 read the same banks (8 floats = 32 bytes apart): a 2-way conflict
// on every load of A.
template <int BM_, int BN_, int TM_, int TN_>
struct V3Tile {
  static constexpr int kBM = BM_, kBN = BN_, kTM = TM_, kTN = TN_;
  static constexpr int kThreads = (BM_ / TM_) * (BN_ / TN_);
  static_assert(TM_ % 4 == 0 && TN_ % 4 == 0, "16-byte loads of A and B");
  static constexpr int kRowRuns = TM_ / 4;
  // Row i of thread row-index tr in the block tile.
  __host__ __device__ static constexpr int row(int tr, int i) {
    return (i / 4) * (BM_ / kRowRuns) + tr * 4 + i % 4;
  }
  // Every row of the tile belongs to one thread, and a thread's rows grow with i.
  static constexpr bool rows_partition() {
    int owners[BM_] = {};
    for (int tr = 0; tr < BM_ / TM_; ++tr)
      for (int i = 0; i < TM_; ++i) {
        const int r = row(tr, i);
        if (r < 0 || r >= BM_ || (i > 0 && r <= row(tr, i - 1))) return false;
        ++owners[r];
      }
    for (int r = 0; r < BM_; ++r)
      if (owners[r] != 1) return false;
    return true;
  }
};
// 128 x 128 outputs, 8 x 8 per thread, 256 threads: per k each thread reads 8 + 8 values from
// shared memory (four 16-byte loads) for 64 FFMAs, and the block reads 128 + 128 values from
// global memory per 16384 FFMAs.
using V3Large = V3Tile<128, 128, 8, 8>;
static_assert(V3Large::rows_partition(), "V3Tile::row covers the tile");
// 64 x 64, 8 x 8 per thread, 64 threads: for GEMMs too small to give the GPU enough large tiles
// (the deep layers at batch 1, the 64-channel side of the weight gradients).
using V3Small = V3Tile<64, 64, 8, 8>;
static_assert(V3Small::rows_partition(), "V3Tile::row covers the tile");
constexpr int kV3BK = 8;   // 2 x 8 x (128+4) floats for A and B each: 17 KB, double-buffered
constexpr int kV3Pad = 4;  // row padding: keeps 16-byte alignment, spreads the k-fast copies of
                           // a warp over all 32 banks

template <class Gemm, class Tile>
__global__ void __launch_bounds__(Tile::kThreads) conv3x3_v3_igemm(const Gemm g) {
  constexpr int BM = Tile::kBM, BN = Tile::kBN, TM = Tile::kTM, TN = Tile::kTN, BK = kV3BK;
  constexpr int kThreads = Tile::kThreads;
  using ACopy = TileCopy<BM, BK, kThreads, Gemm::kARowsContiguous>;
  using BCopy = TileCopy<BN, BK, kThreads, Gemm::kBRowsContiguous>;
  // k-major tiles: the TM (TN) values a thread needs for one k are contiguous: float4 reads.
  __shared__ __align__(16) float As[2][BK][BM + kV3Pad];
  __shared__ __align__(16) float Bs[2][BK][BN + kV3Pad];

  const int tid = threadIdx.x;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int n0 = blockIdx.y * BN;
  int64_t t_begin, t_end;
  k_tile_range(g.k_tiles(BK), t_begin, t_end);

  typename Gemm::ARow arow[ACopy::kPerThread];
  typename Gemm::BRow brow[BCopy::kPerThread];
#pragma unroll
  for (int r = 0; r < ACopy::kPerThread; ++r) arow[r] = g.a_row(m0 + ACopy::row(tid, r));
#pragma unroll
  for (int r = 0; r < BCopy::kPerThread; ++r) brow[r] = g.b_row(n0 + BCopy::row(tid, r));

  // Global -> registers (the next tile, while the current one is multiplied), registers -> shared.
  float a_next[ACopy::kPerThread], b_next[BCopy::kPerThread];
  auto fetch = [&](int64_t tile) {
#pragma unroll
    for (int r = 0; r < ACopy::kPerThread; ++r) {
      const CopySource s = a_source(g, arow[r], g.k_pos(tile, BK, ACopy::k(tid, r)));
      a_next[r] = s.valid ? __ldg(s.p) : 0.0f;
    }
#pragma unroll
    for (int r = 0; r < BCopy::kPerThread; ++r) {
      const CopySource s = b_source(g, brow[r], g.k_pos(tile, BK, BCopy::k(tid, r)));
      b_next[r] = s.valid ? __ldg(s.p) : 0.0f;
    }
  };
  auto stash = [&](int buf) {
#pragma unroll
    for (int r = 0; r < ACopy::kPerThread; ++r)
      As[buf][ACopy::k(tid, r)][ACopy::row(tid, r)] = a_next[r];
#pragma unroll
    for (int r = 0; r < BCopy::kPerThread; ++r)
      Bs[buf][BCopy::k(tid, r)][BCopy::row(tid, r)] = b_next[r];
  };

  // Thread (tr, tc) owns rows Tile::row(tr, 0 .. TM-1) (runs of 4) and columns tc*TN .. +TN of the
  // block's tile. Consecutive threads take consecutive runs: outputs are contiguous along m (NCHW).
  const int tr = tid % (BM / TM), tc = tid / (BM / TM);
  float acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = 0.0f;

  if (t_begin < t_end) {
    fetch(t_begin);
    stash(0);
  }
  __syncthreads();
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int buf = static_cast<int>((t - t_begin) & 1);
    if (t + 1 < t_end) fetch(t + 1);  // in flight during the FFMAs below
#pragma unroll
    for (int k = 0; k < BK; ++k) {
      float a[TM], b[TN];
#pragma unroll
      for (int i = 0; i < TM; i += 4) {
        const float4 v = *reinterpret_cast<const float4*>(&As[buf][k][Tile::row(tr, i)]);
        a[i] = v.x, a[i + 1] = v.y, a[i + 2] = v.z, a[i + 3] = v.w;
      }
#pragma unroll
      for (int j = 0; j < TN; j += 4) {
        const float4 v = *reinterpret_cast<const float4*>(&Bs[buf][k][tc * TN + j]);
        b[j] = v.x, b[j + 1] = v.y, b[j + 2] = v.z, b[j + 3] = v.w;
      }
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    // The other buffer was last read before the previous barrier: safe to overwrite.
    if (t + 1 < t_end) stash(buf ^ 1);
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t m = m0 + Tile::row(tr, i);
    if (m >= g.M) break;  // the rows grow with i
    const typename Gemm::CRow row = g.c_row(m);
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int n = n0 + tc * TN + j;
      if (n < g.cols) g.store(row, n, acc[i][j]);
    }
  }
}

// =================================================================================================
// v4: the same GEMMs on TF32 tensor cores (mma.sync.m16n8k8), tiles staged with cp.async into
// two shared buffers: the copies of tile t+1 are in flight while the warps multiply tile t.
// =================================================================================================

// Block tile BM x BN over WARPS_M x WARPS_N warps; each warp owns a (BM/WARPS_M) x (BN/WARPS_N)
// piece made of 16 x 8 mma tiles, its accumulators in registers.
template <int BM_, int BN_, int WARPS_M_, int WARPS_N_>
struct V4Tile {
  static constexpr int kBM = BM_, kBN = BN_, kWarpsM = WARPS_M_, kWarpsN = WARPS_N_;
  static constexpr int kThreads = WARPS_M_ * WARPS_N_ * 32;
  static constexpr int kWM = BM_ / WARPS_M_, kWN = BN_ / WARPS_N_;
  static constexpr int kMmaM = kWM / 16, kMmaN = kWN / 8;  // mma tiles per warp
  static_assert(kMmaM * 16 == kWM && kMmaN * 8 == kWN, "warp tiles are whole mma tiles");
};
// 128 x 128, 8 warps of 64 x 32 (4 x 4 mma tiles, 64 accumulators per thread): each fragment of
// A feeds 4 mma, each of B 4.
using V4Large = V4Tile<128, 128, 2, 4>;
// 64 x 64, 4 warps of 32 x 32 (2 x 4 mma tiles): more blocks for small GEMMs.
using V4Small = V4Tile<64, 64, 2, 2>;
constexpr int kV4BK = 16;  // two k8 steps per stage; 2 stages of A and B take at most 40 KB, under
                           // the 48 KB of static shared memory

// A ROWS x BK operand tile in shared memory. K_MAJOR ([k][ROWS + 8]) when the copies run along
// the rows, else row-major ([row][BK + 4]) so that 16-byte copies land on 4 consecutive k. Both
// paddings make the fragment reads of a warp (8 rows x 4 k) hit 32 different banks:
// (t*(ROWS+8) + g) % 32 and (g*(BK+4) + t) % 32 are distinct for g < 8, t < 4.
template <int ROWS, bool K_MAJOR>
struct V4Smem {
  static constexpr int kSize = K_MAJOR ? kV4BK * (ROWS + 8) : ROWS * (kV4BK + 4);
  __host__ __device__ static constexpr int at(int row, int k) {
    return K_MAJOR ? k * (ROWS + 8) + row : row * (kV4BK + 4) + k;
  }
};

// Where copy r of a thread lands (Smem::at) and which k it takes, relative to its copy 0, as
// thread 0 has them; constant_offsets: every thread has the same (so they are compile-time
// constants: TileCopy's and CoreMatrixCopy's mappings into their layouts are, and this checks it).
template <class Copy, class Smem>
__host__ __device__ constexpr int smem_offset(int r) {
  return Smem::at(Copy::row(0, r), Copy::k(0, r)) - Smem::at(Copy::row(0, 0), Copy::k(0, 0));
}
template <class Copy>
__host__ __device__ constexpr int k_offset(int r) {
  return Copy::k(0, r) - Copy::k(0, 0);
}
// The copies of a row slot (Copy::row_slot) all take the same row, and those of a k slot
// (Copy::k_slot) the same k, in every thread.
// Each copy is compared with the first of its slot, found once for all threads: linear in the
// threads (the pairwise form passed the compiler's constexpr step limit at 32 copies per thread).
template <class Copy>
constexpr bool slots_share_rows() {
  for (int r = 0; r < Copy::kPerThread; ++r) {
    int row_first = r, k_first = r;  // the first copy of r's row slot, of its k slot
    for (int q = r - 1; q >= 0; --q) {
      if (Copy::row_slot(q) == Copy::row_slot(r)) row_first = q;
      if (Copy::k_slot(q) == Copy::k_slot(r)) k_first = q;
    }
    for (int tid = 0; tid < Copy::kThreads; ++tid)
      if (Copy::row(tid, row_first) != Copy::row(tid, r) || Copy::k(tid, k_first) != Copy::k(tid, r))
        return false;
  }
  return true;
}
// Whether copy r is the first of its row slot (its k slot): the one that decodes the row (reads
// the k position).
template <class Copy>
__host__ __device__ constexpr bool first_of_row_slot(int r) {
  for (int q = 0; q < r; ++q)
    if (Copy::row_slot(q) == Copy::row_slot(r)) return false;
  return true;
}
template <class Copy>
__host__ __device__ constexpr bool first_of_k_slot(int r) {
  for (int q = 0; q < r; ++q)
    if (Copy::k_slot(q) == Copy::k_slot(r)) return false;
  return true;
}
// The k positions (from the block's table) of a thread's copies of one tile. A load from the
// table after a cp.async is not merged with the same load before it (the compiler keeps
// shared-memory loads after the asm), so a thread with at most kMaxKSlotsHeld distinct k (k slots:
// the weight gradients' copies have one k per thread) reads them all before its first copy; with
// more, copy by copy (held, they would take too many registers).
constexpr int kMaxKSlotsHeld = 2;
template <class Copy, class KPos>
struct KPosOfCopies {
  static constexpr bool kHeld = Copy::kKSlots <= kMaxKSlotsHeld;
  KPos held[kHeld ? Copy::kKSlots : 1];

  __device__ KPosOfCopies(const KPos* kps, int tid) {
    if constexpr (kHeld) {
#pragma unroll
      for (int r = 0; r < Copy::kPerThread; ++r)
        if (first_of_k_slot<Copy>(r)) held[Copy::k_slot(r)] = kps[Copy::k(tid, r)];
    }
  }
  // copy r's k position
  __device__ KPos of(const KPos* kps, int tid, int r) const {
    if constexpr (kHeld) return held[Copy::k_slot(r)];
    else return kps[Copy::k(tid, r)];
  }
};
template <class Copy, class Smem>
constexpr bool constant_offsets() {
  for (int tid = 0; tid < Copy::kThreads; ++tid)
    for (int r = 0; r < Copy::kPerThread; ++r)
      if (Smem::at(Copy::row(tid, r), Copy::k(tid, r)) -
                  Smem::at(Copy::row(tid, 0), Copy::k(tid, 0)) != smem_offset<Copy, Smem>(r) ||
          Copy::k(tid, r) - Copy::k(tid, 0) != k_offset<Copy>(r))
        return false;
  return true;
}

// The cp.async side of v4-v6: the rows of A and B that one thread copies (decoded once), and its
// copies of one K tile into a shared-memory tile laid out by ASmem / BSmem (their at(row, k)).
// Elements that are zero (past an edge, outside dy) are zero-filled by cp.async itself (a source
// size of 0), so they too land only at the wait. VEC_A / VEC_B: 16-byte copies of four
// consecutive k.
template <class Gemm, class ACopy, class BCopy, bool VEC_A, bool VEC_B>
struct AsyncTileCopier {
  static_assert(slots_share_rows<ACopy>() && slots_share_rows<BCopy>(), "a slot is one row or k");
  // One decoded row per slot (Copy::row_slot(r): the copies of a slot share its row).
  typename Gemm::ARow arow[ACopy::kRowSlots];
  typename Gemm::BRow brow[BCopy::kRowSlots];

  __device__ AsyncTileCopier(const Gemm& g, int64_t m0, int n0, int tid) {
#pragma unroll
    for (int r = 0; r < ACopy::kPerThread; ++r)
      if (first_of_row_slot<ACopy>(r)) arow[ACopy::row_slot(r)] = g.a_row(m0 + ACopy::row(tid, r));
#pragma unroll
    for (int r = 0; r < BCopy::kPerThread; ++r)
      if (first_of_row_slot<BCopy>(r)) brow[BCopy::row_slot(r)] = g.b_row(n0 + BCopy::row(tid, r));
  }

  // One copy, or zeros where not `copy` (past an edge): the zero-filling cp.async, whose source
  // must still be a valid address (CopySource).
  template <bool VEC>
  __device__ static void cp_async_or_zero(float* dst, const float* src, bool copy) {
    if constexpr (VEC) cp_async_16_or_zero(dst, src, copy);
    else cp_async_4_or_zero(dst, src, copy);
  }

  // The k positions of K tile `tile`, decoded once per block: threads 0 .. bk-1 write kps[0 .. bk)
  // (a barrier must follow before `issue` reads them). Decoding a k (divisions by 9 and 3 in the
  // convolutions' views, by the pixels per image in the weight gradients') for each of a thread's
  // copies took most of the instructions of the copy phase.
  // A tap-major view (conv3x3.cu) needs no table.
  __device__ static void decode(const Gemm& g, int64_t tile, int bk, typename Gemm::KPos* kps,
                                int tid) {
    if constexpr (!IsTapMajor<Gemm>::value) {
      if (tid < bk) kps[tid] = g.k_pos(tile, bk, tid);
    }
  }

  // Issues this thread's copies of K tile `tile` into `as` and `bs`; commits nothing. The k
  // positions come from `kps` (what `decode` put there), or for a tap-major view from one
  // k_tile per tile.
  template <class ASmem, class BSmem>
  __device__ void issue(const Gemm& g, int64_t tile, int bk, const typename Gemm::KPos* kps,
                        float* as, float* bs, int tid) const {
    // Copy r of a thread lands a constant distance from its copy 0, in shared memory and in k
    // (checked at compile time, for every thread): an immediate offset in the copy instruction.
    static_assert(constant_offsets<ACopy, ASmem>() && constant_offsets<BCopy, BSmem>(),
                  "copy r of every thread lies as far from its copy 0");
    const int a_k0 = ACopy::k(tid, 0), b_k0 = BCopy::k(tid, 0);
    float* const a_dst = as + ASmem::at(ACopy::row(tid, 0), a_k0);
    float* const b_dst = bs + BSmem::at(BCopy::row(tid, 0), b_k0);
    if constexpr (IsTapMajor<Gemm>::value) {
      // One k_tile per tile, one a_tile / b_tile per row (a row's copies share it); each copy
      // adds a constant number of k steps to its row's pointer (constant_offsets).
      // Copy r reads a_first + a_step * k_offset(r) elements past its row's source: an int (the
      // launchers take tap-major views only where an image's channels span fewer than 2^31
      // elements), the same in every tile where a_step is. The row's source is opaque to the
      // compiler, which would otherwise fold the tile's offset into each copy's in 64-bit
      // arithmetic (six instructions per copy instead of one multiply-add).
      const typename Gemm::KTile kt = g.k_tile(tile, bk);
      const int a_step = g.a_k_step(kt);
      const int a_first = a_step * a_k0;
#pragma unroll
      for (int r = 0; r < ACopy::kPerThread; ++r) {
        const CopySource a = g.a_tile(arow[ACopy::row_slot(r)], kt);
        cp_async_or_zero<VEC_A>(a_dst + smem_offset<ACopy, ASmem>(r),
                                opaque_pointer(a.p) + (a_first + a_step * k_offset<ACopy>(r)),
                                a.valid);
      }
#pragma unroll
      for (int r = 0; r < BCopy::kPerThread; ++r) {
        const CopySource b = g.b_tile(brow[BCopy::row_slot(r)], kt);
        cp_async_or_zero<VEC_B>(b_dst + smem_offset<BCopy, BSmem>(r),
                                b.p + b_k0 + k_offset<BCopy>(r), b.valid);
      }
    } else {
      // The k positions, each read whole (no load behind a branch); see KPosOfCopies.
      const KPosOfCopies<ACopy, typename Gemm::KPos> a_kps(kps, tid);
      const KPosOfCopies<BCopy, typename Gemm::KPos> b_kps(kps, tid);
#pragma unroll
      for (int r = 0; r < ACopy::kPerThread; ++r) {
        const CopySource a = a_source(g, arow[ACopy::row_slot(r)], a_kps.of(kps, tid, r));
        cp_async_or_zero<VEC_A>(a_dst + smem_offset<ACopy, ASmem>(r), a.p, a.valid);
      }
#pragma unroll
      for (int r = 0; r < BCopy::kPerThread; ++r) {
        const CopySource b = b_source(g, brow[BCopy::row_slot(r)], b_kps.of(kps, tid, r));
        cp_async_or_zero<VEC_B>(b_dst + smem_offset<BCopy, BSmem>(r), b.p, b.valid);
      }
    }
  }
};

// acc[i][j] = {C[gid][2tig], C[gid][2tig+1], C[gid+8][2tig], C[gid+8][2tig+1]} of mma tile
// (i, j) (the layout of mma.m16n8k8 .tf32 and of mma.m16n8k16 .bf16): for a fixed register, the 8
// lanes of a column group store 8 consecutive m.
template <class Tile, class Gemm>
__device__ __forceinline__ void store_mma_accumulators(
    const Gemm& g, const float (&acc)[Tile::kMmaM][Tile::kMmaN][4], int64_t m0, int n0, int wm,
    int wn, int gid, int tig) {
#pragma unroll
  for (int i = 0; i < Tile::kMmaM; ++i) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t m = m0 + wm * Tile::kWM + i * 16 + gid + 8 * half;
      if (m >= g.M) continue;
      const typename Gemm::CRow row = g.c_row(m);
#pragma unroll
      for (int j = 0; j < Tile::kMmaN; ++j) {
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          const int n = n0 + wn * Tile::kWN + j * 8 + 2 * tig + q;
          if (n < g.cols) g.store(row, n, acc[i][j][2 * half + q]);
        }
      }
    }
  }
}

template <class Gemm, class Tile, bool VEC_A, bool VEC_B>
__global__ void __launch_bounds__(Tile::kThreads) conv3x3_v4_tf32_mma(const Gemm g) {
  constexpr int BM = Tile::kBM, BN = Tile::kBN, BK = kV4BK, kThreads = Tile::kThreads;
  constexpr int MT = Tile::kMmaM, NT = Tile::kMmaN;
  using ACopy = TileCopy<BM, BK, kThreads, Gemm::kARowsContiguous, VEC_A ? 4 : 1>;
  using BCopy = TileCopy<BN, BK, kThreads, Gemm::kBRowsContiguous, VEC_B ? 4 : 1>;
  using ASmem = V4Smem<BM, Gemm::kARowsContiguous>;
  using BSmem = V4Smem<BN, Gemm::kBRowsContiguous>;
  __shared__ __align__(16) float As[2][ASmem::kSize];
  __shared__ __align__(16) float Bs[2][BSmem::kSize];
  // The k positions of tile u in kps[(u - t_begin) % 3]: three sets, since a set is rewritten
  // before the barrier of the iteration that follows its last reader's.
  __shared__ typename Gemm::KPos kps[3][BK];

  const int tid = threadIdx.x;
  const int warp = tid / 32, lane = tid % 32;
  const int wm = warp % Tile::kWarpsM, wn = warp / Tile::kWarpsM;
  const int gid = lane / 4, tig = lane % 4;  // the mma fragment coordinates of this lane
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int n0 = blockIdx.y * BN;
  int64_t t_begin, t_end;
  k_tile_range(g.k_tiles(BK), t_begin, t_end);

  using Copier = AsyncTileCopier<Gemm, ACopy, BCopy, VEC_A, VEC_B>;
  const Copier copier(g, m0, n0, tid);
  auto set = [&](int64_t tile) { return static_cast<int>((tile - t_begin) % 3); };
  // The copies of K tile `tile` into buffer `buf`, as one commit group.
  auto issue = [&](int64_t tile, int buf) {
    copier.template issue<ASmem, BSmem>(g, tile, BK, kps[set(tile)], As[buf], Bs[buf], tid);
    cp_async_commit();
  };

  float acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.0f;

  // Tile t + 2's k positions are decoded in iteration t, before its barrier, which publishes them
  // for issue(t + 2) in iteration t + 1. They go to the set of tile t - 1, whose last reader,
  // issue(t - 1) in iteration t - 2, came before the barrier of iteration t - 2.
  if (t_begin < t_end) Copier::decode(g, t_begin, BK, kps[0], tid);
  if (t_begin + 1 < t_end) Copier::decode(g, t_begin + 1, BK, kps[1], tid);
  __syncthreads();
  if (t_begin < t_end) issue(t_begin, 0);
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int buf = static_cast<int>((t - t_begin) & 1);
    if (t + 2 < t_end) Copier::decode(g, t + 2, BK, kps[set(t + 2)], tid);
    if (t + 1 < t_end) {
      issue(t + 1, buf ^ 1);  // the other buffer was last read before the previous barrier
      cp_async_wait<1>();     // tile t has landed (tile t+1 may still be in flight)
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // ... for every thread's copies
    const float* as = As[buf];
    const float* bs = Bs[buf];
#pragma unroll
    for (int kk = 0; kk < BK; kk += 8) {
      uint32_t a[MT][4], b[NT][2];
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        const int r = wm * Tile::kWM + i * 16 + gid;
        a[i][0] = to_tf32(as[ASmem::at(r, kk + tig)]);
        a[i][1] = to_tf32(as[ASmem::at(r + 8, kk + tig)]);
        a[i][2] = to_tf32(as[ASmem::at(r, kk + tig + 4)]);
        a[i][3] = to_tf32(as[ASmem::at(r + 8, kk + tig + 4)]);
      }
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const int c = wn * Tile::kWN + j * 8 + gid;
        b[j][0] = to_tf32(bs[BSmem::at(c, kk + tig)]);
        b[j][1] = to_tf32(bs[BSmem::at(c, kk + tig + 4)]);
      }
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j) mma_tf32_m16n8k8(acc[i][j], a[i], b[j]);
    }
    __syncthreads();  // everyone is done with `buf` before the next iteration refills it
  }

  store_mma_accumulators<Tile>(g, acc, m0, n0, wm, wn, gid, tig);
}

// =================================================================================================
// v5: bf16 tensor cores (mma.sync.m16n8k16, FP32 accumulators), a deeper cp.async pipeline.
// Two changes over v4, each for a measured reason on paper (PERFORMANCE.md): the bf16 mma does
// twice the FLOPs of the TF32 one per instruction, so v4's double buffer would leave the tensor
// cores waiting on memory; here kV5Stages tiles are in flight, in dynamic shared memory (four
// stages of the large tile pass the 48 KB of static shared memory).
// The buffers stay float32 (so every op around the convolution is unchanged): the tiles are
// copied as float32 and rounded to bf16 (round to nearest even) when the fragments are built.
// =================================================================================================

constexpr int kV5BK = 16;     // one k16 mma step per stage
constexpr int kV5Stages = 4;  // tiles in flight: the one multiplied and three being copied

// The dynamic shared memory of v5 and v6: S stages of A (ASmem) then B (BSmem) tiles, then BK k
// positions per stage; and the copies into it. Stage s holds K tile t_begin + s modulo S.
template <class Gemm, class ASmem, class BSmem, class ACopy, class BCopy, bool VEC_A, bool VEC_B,
          int S, int BK>
struct StagedCopies {
  static constexpr int kStageFloats = ASmem::kSize + BSmem::kSize;
  static constexpr size_t kSmemBytes =
      sizeof(float) * S * kStageFloats + sizeof(typename Gemm::KPos) * S * BK;
  static_assert(sizeof(float) * S * kStageFloats % alignof(typename Gemm::KPos) == 0,
                "the k positions after the stages are aligned");
  using Copier = AsyncTileCopier<Gemm, ACopy, BCopy, VEC_A, VEC_B>;

  float* smem;
  Copier copier;
  int64_t t_end;
  int tid;

  __device__ StagedCopies(float* smem_, const Gemm& g, int64_t m0, int n0, int64_t t_end_, int tid_)
      : smem(smem_), copier(g, m0, n0, tid_), t_end(t_end_), tid(tid_) {}
  __device__ float* a_stage(int s) const { return smem + s * kStageFloats; }
  __device__ float* b_stage(int s) const { return smem + s * kStageFloats + ASmem::kSize; }
  __device__ typename Gemm::KPos* kps(int s) const {
    return reinterpret_cast<typename Gemm::KPos*>(smem + S * kStageFloats) + s * BK;
  }
  // The k positions of tile `tile` into stage s's entries (a barrier must come before `issue`).
  __device__ void decode(const Gemm& g, int64_t tile, int s) const {
    if (tile < t_end) Copier::decode(g, tile, BK, kps(s), tid);
  }
  // The copies of K tile `tile` into stage s, as one commit group; past the end of this block's K
  // range an empty group, so that the count of groups in flight is the same every iteration.
  __device__ void issue(const Gemm& g, int64_t tile, int s) const {
    if (tile < t_end)
      copier.template issue<ASmem, BSmem>(g, tile, BK, kps(s), a_stage(s), b_stage(s), tid);
    cp_async_commit();
  }
};

// A ROWS x kV5BK float32 operand tile. The fragments read two consecutive k per register, so the
// paddings differ from v4's: K_MAJOR ([k][ROWS + 4]): the lane (g, t) reads k = 2t (and 2t+1) of
// row g: bank (8t + g) % 32, all 32 distinct; row-major ([row][BK + 8]): 8-byte reads of k = 2t,
// 2t+1 at row*24 + 2t: each half warp (the unit of an 8-byte shared load) hits 32 banks once.
template <int ROWS, bool K_MAJOR>
struct V5Smem {
  static constexpr int kSize = K_MAJOR ? kV5BK * (ROWS + 4) : ROWS * (kV5BK + 8);
  static_assert(kSize % 4 == 0, "every stage starts 16-byte aligned");
  __host__ __device__ static constexpr int at(int row, int k) {
    return K_MAJOR ? k * (ROWS + 4) + row : row * (kV5BK + 8) + k;
  }
  // Elements (row, k) and (row, k + 1), k even, rounded and packed into one bf16x2 register.
  __device__ static uint32_t pair(const float* tile, int row, int k) {
    if constexpr (K_MAJOR) {
      return pack_bf16x2(tile[at(row, k)], tile[at(row, k + 1)]);
    } else {
      const float2 v = *reinterpret_cast<const float2*>(&tile[at(row, k)]);
      return pack_bf16x2(v.x, v.y);
    }
  }
};

template <class Gemm, class Tile>
struct V5Layout {
  using ASmem = V5Smem<Tile::kBM, Gemm::kARowsContiguous>;
  using BSmem = V5Smem<Tile::kBN, Gemm::kBRowsContiguous>;
  template <bool VEC_A, bool VEC_B>
  using Staged =
      StagedCopies<Gemm, ASmem, BSmem,
                   TileCopy<Tile::kBM, kV5BK, Tile::kThreads, Gemm::kARowsContiguous, VEC_A ? 4 : 1>,
                   TileCopy<Tile::kBN, kV5BK, Tile::kThreads, Gemm::kBRowsContiguous, VEC_B ? 4 : 1>,
                   VEC_A, VEC_B, kV5Stages, kV5BK>;
  // the same for every VEC_A, VEC_B: the stages, then the k positions of each stage's tile
  static constexpr size_t kSmemBytes = Staged<false, false>::kSmemBytes;
};

template <class Gemm, class Tile, bool VEC_A, bool VEC_B>
__global__ void __launch_bounds__(Tile::kThreads) conv3x3_v5_bf16_mma(const Gemm g) {
  constexpr int BM = Tile::kBM, BN = Tile::kBN, BK = kV5BK, S = kV5Stages;
  constexpr int MT = Tile::kMmaM, NT = Tile::kMmaN;
  using Layout = V5Layout<Gemm, Tile>;
  using ASmem = typename Layout::ASmem;
  using BSmem = typename Layout::BSmem;
#ifdef UNET_CPU_EMULATION
  float* smem = cpu_emulation::dynamic_shared<float>();
#else
  extern __shared__ __align__(16) float smem[];
#endif

  const int tid = threadIdx.x;
  const int warp = tid / 32, lane = tid % 32;
  const int wm = warp % Tile::kWarpsM, wn = warp / Tile::kWarpsM;
  const int gid = lane / 4, tig = lane % 4;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int n0 = blockIdx.y * BN;
  int64_t t_begin, t_end;
  k_tile_range(g.k_tiles(BK), t_begin, t_end);

  const typename Layout::template Staged<VEC_A, VEC_B> stages(smem, g, m0, n0, t_end, tid);

  float acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.0f;

  // Prologue: the k positions of tiles t_begin .. t_begin + S - 1, then tiles t_begin ..
  // t_begin + S - 2 in flight. Iteration t decodes tile t + S (issued in iteration t + 1, after
  // the next barrier) into the entries of tile t, which issue(t) read S - 1 iterations before.
#pragma unroll
  for (int s = 0; s < S; ++s) stages.decode(g, t_begin + s, s);
  __syncthreads();
#pragma unroll
  for (int s = 0; s < S - 1; ++s) stages.issue(g, t_begin + s, s);
  for (int64_t t = t_begin; t < t_end; ++t) {
    cp_async_wait<S - 2>();  // this thread's copies of tile t have landed ...
    __syncthreads();         // ... and everyone's; and everyone is done with tile t - 1
    const int s = static_cast<int>((t - t_begin) % S);
    stages.decode(g, t + S, s);
    // Refill the stage of tile t - 1 (free since the barrier) with tile t + S - 1.
    stages.issue(g, t + S - 1, (s + S - 1) % S);
    const float* as = stages.a_stage(s);
    const float* bs = stages.b_stage(s);
    uint32_t a[MT][4], b[NT][2];
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      const int r = wm * Tile::kWM + i * 16 + gid;
      a[i][0] = ASmem::pair(as, r, 2 * tig);
      a[i][1] = ASmem::pair(as, r + 8, 2 * tig);
      a[i][2] = ASmem::pair(as, r, 2 * tig + 8);
      a[i][3] = ASmem::pair(as, r + 8, 2 * tig + 8);
    }
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const int c = wn * Tile::kWN + j * 8 + gid;
      b[j][0] = BSmem::pair(bs, c, 2 * tig);
      b[j][1] = BSmem::pair(bs, c, 2 * tig + 8);
    }
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int j = 0; j < NT; ++j) mma_bf16_m16n8k16(acc[i][j], a[i], b[j]);
  }
  cp_async_wait<0>();  // only empty groups are left; retire them all the same

  store_mma_accumulators<Tile>(g, acc, m0, n0, wm, wn, gid, tig);  // v4's layout
}

// =================================================================================================
// v6: Hopper's warpgroup MMA (wgmma, sm_90a). v4 multiplies 16 x 8 x 8 per warp-wide mma.sync,
// each warp first loading its fragments from shared memory into registers. Here four warps (a
// warpgroup, 128 threads) issue one asynchronous 64 x N x 8 product that reads both operands
// straight from shared memory, described by 64-bit matrix descriptors: no fragment loads, no
// conversions (the tensor core reads the upper 19 bits of each float32: TF32 by truncation), and
// the math runs while the same threads issue the next tile's copies. Tiles are laid out as the
// descriptors expect (K-major, unswizzled: 8-row x 16-byte core matrices), filled by v5's
// cp.async pipeline (V6Tile: 4 stages; 6 in the wide tile). Two warpgroups per block, each owning
// half of its rows: 64 of 128, or, in the tall tile of the 64-column outputs, 128 of 256 (two
// 64-row products per k8 step), which reads each column's operand (the weights, in the forward)
// once for twice the rows;
// or, in the wide tile of the weight gradients, 64 of 128 rows by 256 columns (two 128-column
// products per k8 step), which reads each row's operand (dy) once for twice the columns; or, in
// their 64-row tile, all 64 rows by 96 of 192 columns (the warpgroups split the columns).
// =================================================================================================

// A block tile of v6: BM x BN outputs, K in steps of BK, S stages in flight.
template <int BM_, int BN_, int BK_, int S_>
struct V6Tile {
  static constexpr int kBM = BM_, kBN = BN_, kBK = BK_, kStages = S_;
};
constexpr int kV6BM = 128;     // two warpgroups of 64 rows
constexpr int kV6TallBM = 256; // two warpgroups of 128 rows: the 64-column tile where M allows

// The rows of v6's block tile: 128 for the 128-column tile; for the 64-column one, 256 where the
// GEMM has more than 128 rows and at least kV6TallMinKTiles K tiles. The 64-column outputs are the
// 64-channel layers (d1b, u4a, u4b and the backward data of d2a), where each 128-row block reads
// all of B (d1b's forward: the 147 KB of weights) for its 128 pixels: the tall tile halves that
// traffic through L2, which ran at 75-77% of its peak in those kernels (ncu at 53cf464), and they
// took 0.68-0.79x their time (726e436). The first layer's forward (K = 9: one K tile, its time
// all prologue and stores) took 1.3x, with one block of 160 KB per SM where the 128-row tile's
// 96 KB fit two: it keeps the 128-row tile.
constexpr int64_t kV6TallMinKTiles = 8;
__host__ __device__ constexpr int v6_rows(bool wide, int64_t M, int64_t k_tiles) {
  return !wide && M > kV6BM && k_tiles >= kV6TallMinKTiles ? kV6TallBM : kV6BM;
}
constexpr int kV6BK = 32;      // four k8 products per stage
constexpr int kV6Stages = 4;   // two tiles being copied while one is multiplied and one retires
constexpr int kV6Threads = 256;
using V6Square = V6Tile<kV6BM, 128, kV6BK, kV6Stages>;
using V6Narrow = V6Tile<kV6BM, 64, kV6BK, kV6Stages>;
using V6Tall = V6Tile<kV6TallBM, 64, kV6BK, kV6Stages>;
// The weight gradients' wide tile: 128 x 256. In these GEMMs (rows O, columns 9C, K the pixels)
// A is dy, copied 16 bytes at a time past L1 (cp.async.cg) and read once per column tile, while
// B's copies (the 3x3 windows of x, 4 bytes each) hit L1 for the nine taps of a channel: A is
// most of what a block reads from L2, and 256 columns halve it per FLOP. Two 128-column products
// per warpgroup and k8 step, 128 accumulators per thread. K steps of 16 in 6 stages: 24 KB a
// stage, 147 KB in all (4 stages of 32 would take 192 KB, and a deeper pipeline that left L1 that
// little was measured slower; docs/CONV3X3.md), with as many k in flight as the other tiles (four
// tiles of 16 being copied) and the same products per iteration (four of 64 x 128 x 8). Where the
// columns are a whole number of 256 (9C: C a multiple of 256; the up-convolution's 4O: every O a
// multiple of 64): weight_gemm_tile.
using V6Wide = V6Tile<kV6BM, 256, 16, 6>;
// The weight gradients of at most 64 rows (O <= 64: d1b, u4a, u4b), 64 x 192. In a 128-row tile
// their rows fill one warpgroup and the other multiplies padding, and each stage's 128 columns of
// B serve 64 useful rows. Here the two warpgroups split the columns instead (each m64n96k8), so no
// product is padding, and a stage's copies of dy serve 192 columns: per useful FLOP a third fewer
// copies and a third less of dy from L2. 192 divides 9C where C is a multiple of 64 (576 for d1b
// and u4b, 1152 for u4a's concatenation); four stages of 32 k, 128 KB. weight_gemm_tile.
using V6Rows64 = V6Tile<64, 192, kV6BK, kV6Stages>;
// The forward's and backward data's tall-and-wide tile, 256 x 128, offered only to measurement
// (gemm_tiles; the rules never take it): each warpgroup owns 128 rows by 128 columns (two
// 64 x 128 products per k8 step, 128 accumulators per thread), so each stage's B (the weights)
// serves twice the rows of the 128 x 128 tile and A twice the columns of the 256 x 64 one: per
// FLOP, a quarter fewer bytes from L2 than the square tile. Half the blocks, though: the deep
// layers, whose blocks make a single partial wave, need a split K to fill the GPU, which costs a
// pass over the partials; whether it pays is for autotuning to time. K steps of 16 in 6 stages,
// 147 KB, as the wide tile.
using V6Big = V6Tile<kV6TallBM, 128, 16, 6>;
// The planners count the waves of these four tiles with one block per SM (GemmTile::wave_blocks =
// kSMs): their stages alone take more than half of an SM's 228 KB of shared memory, so a second
// block never fits (their registers, 255 per thread at most for 256 threads, say the same).
template <class Tile>
constexpr bool one_block_per_sm() {
  return 2 * sizeof(float) * Tile::kStages * (Tile::kBM + Tile::kBN) * Tile::kBK > 228 * 1024;
}
static_assert(one_block_per_sm<V6Square>() && one_block_per_sm<V6Tall>() &&
                  one_block_per_sm<V6Wide>() && one_block_per_sm<V6Rows64>() &&
                  one_block_per_sm<V6Big>(),
              "the wave counts of the planners assume one block per SM");

// Element (row, k) of a ROWS x BK operand tile in the canonical K-major unswizzled layout
// (PTX ISA, "Shared Memory Matrix Layout": ((8,m),(T,2k)):((1T,SBO),(1,LBO)), T = 4 floats): for
// each k8 step a ROWS x 8 block; in it, core matrices of 8 rows x 4 floats (16 bytes per row),
// the two k-halves of a row group 32 floats apart (LBO = 128 bytes), row groups 64 floats apart
// (SBO = 256 bytes).
template <int ROWS, int BK>
struct V6Smem {
  static constexpr int kSize = ROWS * BK;
  static constexpr uint32_t kLeadingBytes = 128, kStrideBytes = 256;
  __host__ __device__ static constexpr int at(int row, int k) {
    return (k / 8) * ROWS * 8 + (row / 8) * 64 + ((k % 8) / 4) * 32 + (row % 8) * 4 + k % 4;
  }
};

// A matrix descriptor (PTX ISA, "Matrix Descriptor Format"): start address, leading and stride
// byte offsets (each encoded as (x & 0x3FFFF) >> 4), base offset 0, no swizzle.
__device__ __forceinline__ uint64_t wgmma_descriptor(uint32_t address, uint32_t leading_bytes,
                                                     uint32_t stride_bytes) {
  return static_cast<uint64_t>((address & 0x3FFFF) >> 4) |
         (static_cast<uint64_t>((leading_bytes & 0x3FFFF) >> 4) << 16) |
         (static_cast<uint64_t>((stride_bytes & 0x3FFFF) >> 4) << 32);
}

// The descriptor of the same layout `bytes` further in shared memory: its start address field
// (bits 0-13, the address / 16) advanced. No carry leaves the field, since the advanced address is
// still an address of the shared-memory window (below 2^18 bytes) and all offsets are multiples
// of 16 bytes.
__device__ __forceinline__ uint64_t wgmma_descriptor_advance(uint64_t desc, uint32_t bytes) {
  // a 32-bit add to the low word (the compiler leaves the high word as it is)
  return (desc & 0xFFFFFFFF00000000ull) | (static_cast<uint32_t>(desc) + (bytes >> 4));
}

// Which element of a ROWS x BK tile (V6Smem) the r-th copy of a thread moves, THREADS threads
// copying VEC consecutive k (a "unit") at a time. TileCopy gives a warp 32 rows at one k (or one
// row's 32 k), which in V6Smem's 8-row core matrices land on 8 (or 4) banks: 4- to 8-way conflicts
// on every copy. Here each copy of a warp covers 8 rows x 4 units, lane = 8 * unit + row: the 8
// rows of a core matrix and 4 units of k, which fill the 32 banks once (4-byte copies: bank
// 4 * row + k % 4; 16-byte ones: each quarter warp 8 rows of 16 bytes). As in TileCopy, a thread
// keeps its rows (ROW_FAST: A of the output GEMMs, rows contiguous in memory) or its k (otherwise)
// for all its copies: its rows are decoded once, or its k position read once per tile.
template <int ROWS, int BK, int THREADS, bool ROW_FAST, int VEC = 1>
struct CoreMatrixCopy {
  static constexpr int kThreads = THREADS;
  static constexpr int kUnits = BK / VEC;
  static constexpr int kWarps = THREADS / 32;
  static constexpr int kRowGroups = ROWS / 8, kUnitGroups = kUnits / 4;
  static_assert(ROWS % 8 == 0 && kUnits % 4 == 0, "whole 8-row x 4-unit pieces");
  // the groups a warp keeps (rows when ROW_FAST, units otherwise) and the groups it walks
  static constexpr int kKept = ROW_FAST ? kRowGroups : kUnitGroups;
  static constexpr int kWalked = ROW_FAST ? kUnitGroups : kRowGroups;
  static_assert(kKept % kWarps == 0 || kWarps % kKept == 0, "the kept groups split over warps");
  static constexpr int kKeptPerWarp = kKept >= kWarps ? kKept / kWarps : 1;
  static constexpr int kWarpsPerKept = kKept >= kWarps ? 1 : kWarps / kKept;
  static_assert(kWalked % kWarpsPerKept == 0, "the walked groups split over a kept group's warps");
  static constexpr int kWalkedPerWarp = kWalked / kWarpsPerKept;
  static constexpr int kPerThread = kKeptPerWarp * kWalkedPerWarp;
  // The distinct rows of a thread ("slots"): ROW_FAST, one per kept group; else one per copy.
  static constexpr int kRowSlots = ROW_FAST ? kKeptPerWarp : kPerThread;
  __host__ __device__ static constexpr int row_slot(int r) { return ROW_FAST ? r / kWalkedPerWarp : r; }
  // Its distinct k ("k slots"): ROW_FAST, one per walked group; else one per kept group.
  static constexpr int kKSlots = ROW_FAST ? kWalkedPerWarp : kKeptPerWarp;
  __host__ __device__ static constexpr int k_slot(int r) {
    return ROW_FAST ? r % kWalkedPerWarp : r / kWalkedPerWarp;
  }
  static_assert(kPerThread * 32 * kWarps == kRowGroups * kUnitGroups * 32, "every piece once");

  // copy r = h * kWalkedPerWarp + j: kept group h of the warp's, walked group j of the warp's
  __host__ __device__ static constexpr int kept(int tid, int r) {
    const int w = tid / 32;
    return kKept >= kWarps ? w + kWarps * (r / kWalkedPerWarp) : w % kKept;
  }
  __host__ __device__ static constexpr int walked(int tid, int r) {
    const int w = tid / 32;
    return kKept >= kWarps ? r % kWalkedPerWarp : w / kKept + kWarpsPerKept * (r % kWalkedPerWarp);
  }
  __host__ __device__ static constexpr int row(int tid, int r) {
    return 8 * (ROW_FAST ? kept(tid, r) : walked(tid, r)) + tid % 8;
  }
  __host__ __device__ static constexpr int k(int tid, int r) {
    return VEC * (4 * (ROW_FAST ? walked(tid, r) : kept(tid, r)) + (tid % 32) / 8);
  }
};

// A view whose store reads a value of its own for each element (kReadsBeforeStore: the data
// gradients' relu_mask) gives that read as store_input(row, n) and the store as
// store_with(row, n, v, input). v6's epilogue then issues all of a row's reads before its stores:
// a read may not pass an earlier store it could alias, so read, store, read, store... made each
// element wait a full memory latency.
template <class Gemm, class = void>
struct ViewReadsBeforeStore : std::false_type {};
template <class Gemm>
struct ViewReadsBeforeStore<Gemm, std::void_t<decltype(Gemm::kReadsBeforeStore)>>
    : std::bool_constant<Gemm::kReadsBeforeStore> {};

// One row of a data gradient as a GEMM view's output (its CRow), with the optional relu_mask of
// the same tensor: p and mask point at the row's first element, an element lies `offset` further
// in both. store applies the mask in one step, input / store_with in two (kReadsBeforeStore).
struct MaskedOutputRow {
  float* p;
  const float* mask;  // null: no mask

  __device__ static MaskedOutputRow at(float* out, const float* relu_mask, int64_t e) {
    return {out + e, relu_mask ? relu_mask + e : nullptr};
  }
  __device__ void store(int64_t offset, float v) const {
    p[offset] = relu_masked(v, mask, offset);
  }
  __device__ float input(int64_t offset) const { return relu_mask_value(mask, offset); }
  __device__ void store_with(int64_t offset, float v, float mask_value) const {
    p[offset] = relu_masked_by(v, mask_value);
  }
};

// Stores row m of a warpgroup's m64nN accumulators through the view's epilogue: register
// 4 j + 2 v + q of acc[jn] holds column PN jn + 8 j + 2 tig + q of the row (v: which of the lane's
// two rows, 8 apart); `n_first` is the warpgroup's first column. A view that reads a value per
// element for its store (ViewReadsBeforeStore) reads the whole row's first. (v6 and v7.)
template <class Gemm, int NT, int PN>
__device__ __forceinline__ void store_wgmma_row(const Gemm& g, int64_t m,
                                                const float (&acc)[NT][PN / 2], int v,
                                                int n_first, int tig) {
  const typename Gemm::CRow row = g.c_row(m);
  if constexpr (ViewReadsBeforeStore<Gemm>::value) {
    float input[NT][PN / 8][2];  // the row's reads first, all of them ...
#pragma unroll
    for (int jn = 0; jn < NT; ++jn)
#pragma unroll
      for (int j = 0; j < PN / 8; ++j)
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          const int n = n_first + PN * jn + 8 * j + 2 * tig + q;
          input[jn][j][q] = n < g.cols ? g.store_input(row, n) : 0.0f;
        }
#pragma unroll
    for (int jn = 0; jn < NT; ++jn)  // ... then its stores
#pragma unroll
      for (int j = 0; j < PN / 8; ++j)
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          const int n = n_first + PN * jn + 8 * j + 2 * tig + q;
          if (n < g.cols) g.store_with(row, n, acc[jn][4 * j + 2 * v + q], input[jn][j][q]);
        }
  } else {
#pragma unroll
    for (int jn = 0; jn < NT; ++jn)
#pragma unroll
      for (int j = 0; j < PN / 8; ++j)
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          const int n = n_first + PN * jn + 8 * j + 2 * tig + q;
          if (n < g.cols) g.store(row, n, acc[jn][4 * j + 2 * v + q]);
        }
  }
}

template <class Gemm, class Tile>
struct V6Layout {
  static constexpr int BM = Tile::kBM, BN = Tile::kBN, BK = Tile::kBK;
  using ASmem = V6Smem<BM, BK>;
  using BSmem = V6Smem<BN, BK>;
  template <bool VEC_A, bool VEC_B>
  using Staged =
      StagedCopies<Gemm, ASmem, BSmem,
                   CoreMatrixCopy<BM, BK, kV6Threads, Gemm::kARowsContiguous, VEC_A ? 4 : 1>,
                   CoreMatrixCopy<BN, BK, kV6Threads, Gemm::kBRowsContiguous, VEC_B ? 4 : 1>, VEC_A,
                   VEC_B, Tile::kStages, BK>;
  // the same for every VEC_A, VEC_B: the stages, then the k positions of each stage's tile
  static constexpr size_t kSmemBytes = Staged<false, false>::kSmemBytes;
};

template <class Gemm, class Tile, bool VEC_A, bool VEC_B>
__global__ void __launch_bounds__(kV6Threads) conv3x3_v6_tf32_wgmma(const Gemm g) {
  constexpr int BM = Tile::kBM, BN = Tile::kBN, BK = Tile::kBK, S = Tile::kStages;
  // The two warpgroups split the rows (each owns BM / 2 rows and all BN columns) or, in a tile of
  // 64 rows, the columns (each owns all 64 rows and BN / 2 columns). Per k8 step a warpgroup issues
  // MT x NT products of 64 rows by PN columns: MT x NT x PN / 2 accumulators per thread (64 in the
  // 128 x 128 and 256 x 64 tiles, 128 in the 128 x 256 one, 48 in the 64 x 192 one).
  constexpr int kGroupsM = BM == 64 ? 1 : 2, kGroupsN = 2 / kGroupsM;
  constexpr int kGroupRows = BM / kGroupsM, kGroupCols = BN / kGroupsN, MT = kGroupRows / 64;
  constexpr int PN = kGroupCols < 128 ? kGroupCols : 128, NT = kGroupCols / PN;
  static_assert((BM == kV6BM && (BN == 64 || BN == 128 || BN == 256)) ||
                    (BM == kV6TallBM && (BN == 64 || BN == 128)) || (BM == 64 && BN == 192),
                "the tiles of this kernel: 128 x 128, 128 x 64, 256 x 64, 256 x 128, 128 x 256, "
                "64 x 192");
  static_assert(kGroupCols % PN == 0, "whole products per warpgroup");
  static_assert(BK % 8 == 0, "whole k8 products");
  static_assert(S >= 3, "a stage being copied, one multiplied, one retiring");
  using Layout = V6Layout<Gemm, Tile>;
  using ASmem = typename Layout::ASmem;
  using BSmem = typename Layout::BSmem;
#ifdef UNET_CPU_EMULATION
  float* smem = cpu_emulation::dynamic_shared<float>();
#else
  extern __shared__ __align__(16) float smem[];
#endif

  const int tid = threadIdx.x;
  const int warpgroup = tid / 128;
  const int wg_m = warpgroup % kGroupsM, wg_n = warpgroup / kGroupsM;  // its rows, its columns
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int n0 = blockIdx.y * BN;
  int64_t t_begin, t_end;
  k_tile_range(g.k_tiles(BK), t_begin, t_end);

  // v5's staged copies, into this kernel's layout
  const typename Layout::template Staged<VEC_A, VEC_B> stages(smem, g, m0, n0, t_end, tid);

  float acc[MT][NT][PN / 2];
#pragma unroll
  for (int i = 0; i < MT; ++i) {
#pragma unroll
    for (int jn = 0; jn < NT; ++jn) {
#pragma unroll
      for (int j = 0; j < PN / 2; ++j) acc[i][jn][j] = 0.0f;
      wgmma_fence_operands(acc[i][jn]);
    }
  }

  // Tile t lives in stage (t - t_begin) % S. At iteration t the products of tile t are issued and
  // those of tile t - 1 are waited for (wgmma_wait<1>), so at the barrier of iteration t every
  // warpgroup is done with tile t - 2: its stage takes tile t + S - 2.
  // The k positions of tiles t_begin .. t_begin + S - 2 first. Iteration t decodes tile t + S - 1
  // (issued in iteration t + 1, after the next barrier) into the entries of tile t - 1, which
  // issue(t - 1) read S - 2 iterations before.
#pragma unroll
  for (int s = 0; s < S - 1; ++s) stages.decode(g, t_begin + s, s);
  __syncthreads();
#pragma unroll
  for (int s = 0; s < S - 2; ++s) stages.issue(g, t_begin + s, s);
  // The descriptors of stage 0's first k8 step (A: this warpgroup's first 64 rows; B: its first
  // columns), built once; every other one lies a constant number of bytes further
  // (wgmma_descriptor_advance): the next 64 rows of A 64 / 8 row groups of 64 floats on, the next
  // PN columns of B PN / 8 groups on.
  constexpr uint32_t kStageBytes = sizeof(float) * Layout::template Staged<VEC_A, VEC_B>::kStageFloats;
  constexpr uint32_t kRows64Bytes = sizeof(float) * (64 / 8) * 64;
  constexpr uint32_t kColumnsPNBytes = sizeof(float) * (PN / 8) * 64;
  const uint64_t a_desc0 = wgmma_descriptor(
      shared_address(stages.a_stage(0)) + sizeof(float) * (wg_m * kGroupRows / 8) * 64,
      ASmem::kLeadingBytes, ASmem::kStrideBytes);
  const uint64_t b_desc0 = wgmma_descriptor(
      shared_address(stages.b_stage(0)) + sizeof(float) * (wg_n * kGroupCols / 8) * 64,
      BSmem::kLeadingBytes, BSmem::kStrideBytes);
  int s = 0;  // the stage of tile t: (t - t_begin) % S
  for (int64_t t = t_begin; t < t_end; ++t, s = s + 1 == S ? 0 : s + 1) {
    cp_async_wait<S - 3>();  // this thread's copies of tile t have landed ...
    fence_proxy_async();     // ... and are visible to the tensor cores' reads ...
    __syncthreads();         // ... for every thread's copies; and tile t - 2 is retired
    stages.issue(g, t + S - 2, s >= 2 ? s - 2 : s + S - 2);
    stages.decode(g, t + S - 1, s >= 1 ? s - 1 : s + S - 1);
    const uint32_t stage_bytes = s * kStageBytes;
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < BK / 8; ++ks) {
#pragma unroll
      for (int jn = 0; jn < NT; ++jn) {
        const uint64_t db = wgmma_descriptor_advance(
            b_desc0, stage_bytes + sizeof(float) * ks * BN * 8 + jn * kColumnsPNBytes);
#pragma unroll
        for (int i = 0; i < MT; ++i) {
          const uint64_t da = wgmma_descriptor_advance(
              a_desc0, stage_bytes + sizeof(float) * ks * BM * 8 + i * kRows64Bytes);
          wgmma_tf32<PN>(acc[i][jn], da, db, true);
        }
      }
    }
    wgmma_commit();
    wgmma_wait<1>();
  }
  wgmma_wait<0>();
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int jn = 0; jn < NT; ++jn) wgmma_fence_operands(acc[i][jn]);
  cp_async_wait<0>();  // only empty groups are left

  // acc[i][jn][4j + 2v + q] = D[64i + 16w + g + 8v][PN jn + 8j + 2t + q] of this warpgroup's rows
  // and columns.
  const int lane = tid % 32, w = (tid % 128) / 32, gid = lane / 4, tig = lane % 4;
#pragma unroll
  for (int i = 0; i < MT; ++i) {
#pragma unroll
    for (int v = 0; v < 2; ++v) {
      const int64_t m = m0 + wg_m * kGroupRows + 64 * i + 16 * w + gid + 8 * v;
      if (m >= g.M) continue;
      store_wgmma_row<Gemm, NT, PN>(g, m, acc[i], v, n0 + wg_n * kGroupCols, tig);
    }
  }
}


// =================================================================================================
// Split-K of the forward and backward-data GEMMs: when the output tiles alone cannot fill the GPU
// (the 1024-channel layers at batch 1: b2's forward makes 13 x 16 tiles of 64 x 64), K is split
// too. Each split writes its partial C (no epilogue) through SplitPartialGemm into a workspace
// [splits, cols, M]; conv3x3_split_k_epilogue adds the partials in split order and stores the sum
// through the view's own epilogue (bias and ReLU; or the concatenated view's two outputs).
// =================================================================================================

template <class Gemm>
struct SplitPartialGemm : Gemm {
  static constexpr bool kReadsBeforeStore = false;  // partial sums: the view's store comes later
  float* part;  // [splits, cols, M]: consecutive m, as the mma and FFMA stores write them

  struct CRow {
    float* p;  // &part[split, 0, m]
  };
  __device__ CRow c_row(int64_t m) const {
    return {part + static_cast<int64_t>(blockIdx.z) * this->cols * this->M + m};
  }
  __device__ void store(const CRow& r, int n, float v) const {
    r.p[static_cast<int64_t>(n) * this->M] = v;
  }
};

template <class Gemm>
__global__ void conv3x3_split_k_epilogue(const Gemm g, const float* __restrict__ part, int splits) {
  const int64_t count = g.M * g.cols;
  for (int64_t e = global_thread(); e < count; e += grid_stride()) {
    const int n = static_cast<int>(e / g.M);
    const int64_t m = e - n * g.M;
    float sum = part[e];
    for (int s = 1; s < splits; ++s) sum += part[s * count + e];
    g.store(g.c_row(m), n, sum);
  }
}

// =================================================================================================
// Split-K reduction of the weight gradient: dw[e] = sum over s = 0 .. splits-1 of part[s][e], in
// that order (deterministic).
// =================================================================================================

namespace {  // one copy per translation unit that includes this file

__global__ void conv3x3_split_k_reduce(const float* __restrict__ part, float* __restrict__ dw,
                                       int64_t count, int splits) {
  for (int64_t e = global_thread(); e < count; e += grid_stride()) {
    float sum = part[e];
    for (int s = 1; s < splits; ++s) sum += part[s * count + e];
    dw[e] = sum;
  }
}

}  // namespace

// =================================================================================================
// Launchers: version dispatch, tile choice, split-K plan, grid limits
// =================================================================================================

// The table of measured plans (launchers.h), one for the whole module (conv3x3.cu holds it):
// whether it has an entry for `key` (then in *plan, and the entry counts one more use); an entry
// entered, replacing one of the same key or (replace false) not; and the lock that one tuning at a
// time holds, so that no two time the same GEMM, or time while another runs.
bool find_tuned_gemm_plan(const GemmPlanKey& key, GemmPlan* plan);
void record_tuned_gemm_plan(const TunedGemmPlan& tuned, bool replace);
std::mutex& gemm_tuning_mutex();


namespace {

// Blocks wanted in flight: two waves of an H100's 132 SMs. A constant rather than the device's
// SM count, so that every GPU picks the same tiles and splits and computes the same bits.
constexpr int64_t kTargetBlocks = 264;
// A split of the weight gradient sums at least this many pixels: its partial tile costs a write
// and a read of 4 x BM x BN bytes, worth it only over enough pixels.
constexpr int64_t kMinSplitPixels = 1024;
constexpr int64_t kMaxSplits = 128;
// Cap on the partials workspace (the deep layers need no split; the 64-channel ones need little).
constexpr int64_t kMaxSplitWorkspaceBytes = int64_t{256} << 20;

constexpr int64_t kMaxGridX = INT32_MAX, kMaxGridYZ = 65535;

dim3 checked_grid(const char* kernel, int64_t gx, int64_t gy, int64_t gz) {
  if (gx > kMaxGridX || gy > kMaxGridYZ || gz > kMaxGridYZ)
    throw std::runtime_error(std::string(kernel) + ": grid (" + std::to_string(gx) + ", " +
                             std::to_string(gy) + ", " + std::to_string(gz) +
                             ") exceeds the CUDA grid limits; use version v1_direct");
  return dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(gz));
}

// The large tile when it alone makes enough blocks and the N side fills it; else the small one.
template <class Large, class Small>
bool use_large_tile(int64_t M, int64_t cols) {
  return cols > Small::kBN &&
         ceil_div<int64_t>(M, Large::kBM) * ceil_div<int64_t>(cols, Large::kBN) >= kTargetBlocks;
}

// Blocks run in waves: an H100's 132 SMs (a constant for the same reason as above) times the
// blocks a kernel holds per SM. Known for v6's 128 x 128 and 256 x 64 tiles: one block per SM,
// whatever the view (GemmTile::wave_blocks; the tall tile's 160 KB of shared memory leave room for
// no second). Its 128 x 64 tile holds two blocks of some views and one of others (the weight
// gradients' take over 128 registers), and v3-v5's occupancy varies with the tile and the view:
// those keep the plain rule (wave_blocks 0).
constexpr int64_t kSMs = 132;
static_assert(kTargetBlocks == 2 * kSMs, "two waves of one block per SM");

// Of 1 .. max_splits, the split count of `tiles` output tiles that finishes first, where each block
// of s splits sums 1/s of K and `wave_blocks` blocks run at a time: the least waves(tiles * s) / s,
// ties to more splits; max_splits itself where wave_blocks is 0. Without this, v6's
// ceil(kTargetBlocks / tiles) splits overshot two waves by a few blocks: d1b's weight gradient
// (5 tiles) made 265 blocks of K / 53, three waves where 260 blocks of K / 52 take two (measured on
// an H200: 0.70x the time).
int64_t wave_balanced_splits(int64_t tiles, int64_t max_splits, int64_t wave_blocks) {
  if (wave_blocks <= 0) return max_splits;
  int64_t best = 1, best_waves = ceil_div(tiles, wave_blocks);
  for (int64_t s = 2; s <= max_splits; ++s) {
    const int64_t waves = ceil_div(tiles * s, wave_blocks);
    if (waves * best <= best_waves * s) {  // waves / s <= best_waves / best
      best = s;
      best_waves = waves;
    }
  }
  return best;
}

// Splits of a K made of `units` pieces of `unit_pixels` pixels each, for `tiles` output tiles.
int plan_splits(int64_t tiles, int64_t units, int64_t unit_pixels, int64_t floats_per_split,
                int64_t wave_blocks = 0) {
  if (tiles <= 0 || units <= 1) return 1;
  int64_t s = ceil_div(kTargetBlocks, tiles);
  s = std::min(s, units * unit_pixels / kMinSplitPixels);
  s = std::min(s, kMaxSplits);
  s = std::min(s, kMaxSplitWorkspaceBytes / (4 * std::max<int64_t>(floats_per_split, 1)));
  return static_cast<int>(wave_balanced_splits(tiles, std::max<int64_t>(s, 1), wave_blocks));
}


// The block tile a GEMM version takes for an M x cols output, and its K step: what the planners
// (gemm_tile, weight_gemm_tile) choose and the launchers (launch_gemm) launch. `large`: v3-v5's
// 128 x 128 tile (v6 reads bm and bn instead).
struct GemmTile {
  bool large;
  int bm, bn, bk;
  int64_t wave_blocks = 0;  // blocks in flight on kSMs SMs where known (wave_balanced_splits)
};

// Launch of one GEMM view with version v3 or v4, for `splits` K slices.
template <class Gemm, class Tile>
void launch_v3(const char* name, const Gemm& g, int splits, cudaStream_t stream) {
  const dim3 grid = checked_grid(name, ceil_div<int64_t>(g.M, Tile::kBM),
                                 ceil_div<int64_t>(g.cols, Tile::kBN), splits);
  launch_kernel(name, conv3x3_v3_igemm<Gemm, Tile>, grid, dim3(Tile::kThreads), stream, g);
}

template <class Gemm, class Tile, bool VEC_A, bool VEC_B>
void launch_v4(const char* name, const Gemm& g, int splits, cudaStream_t stream) {
  const dim3 grid = checked_grid(name, ceil_div<int64_t>(g.M, Tile::kBM),
                                 ceil_div<int64_t>(g.cols, Tile::kBN), splits);
  launch_kernel(name, conv3x3_v4_tf32_mma<Gemm, Tile, VEC_A, VEC_B>, grid, dim3(Tile::kThreads),
                stream, g);
}

// v5 and v6 need more than the 48 KB of shared memory a kernel gets by default: raised once per
// kernel and device (the attribute belongs to the kernel on a device, not to a launch; the first
// launch, never a CUDA graph capture, which follows an eager step, pays for the call).
template <auto kKernel>
void allow_dynamic_smem(size_t bytes, const char* name) {
  static std::atomic<bool> done[kMaxDevices] = {};
  int device = 0;
  CUDA_CHECK(cudaGetDevice(&device), name);
  const bool tracked = device >= 0 && device < kMaxDevices;
  if (tracked && done[device].load()) return;
  CUDA_CHECK(cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(bytes)),
             name);
  if (tracked) done[device].store(true);
}

template <class Gemm, class Tile, bool VEC_A, bool VEC_B>
void launch_v5(const char* name, const Gemm& g, int splits, cudaStream_t stream) {
  constexpr size_t kSmem = V5Layout<Gemm, Tile>::kSmemBytes;
  constexpr auto kernel = conv3x3_v5_bf16_mma<Gemm, Tile, VEC_A, VEC_B>;
  allow_dynamic_smem<kernel>(kSmem, name);
  const dim3 grid = checked_grid(name, ceil_div<int64_t>(g.M, Tile::kBM),
                                 ceil_div<int64_t>(g.cols, Tile::kBN), splits);
  launch_kernel_smem(name, kernel, grid, dim3(Tile::kThreads), kSmem, stream, g);
}

template <class Gemm>
void run_v3(const char* name, const Gemm& g, bool large, int splits, cudaStream_t stream) {
  if (large) launch_v3<Gemm, V3Large>(name, g, splits, stream);
  else launch_v3<Gemm, V3Small>(name, g, splits, stream);
}

// VEC_A / VEC_B are template arguments: the caller instantiates only what its view can use.
template <class Gemm, bool VEC_A, bool VEC_B>
void run_v4(const char* name, const Gemm& g, bool large, int splits, cudaStream_t stream) {
  if (large) launch_v4<Gemm, V4Large, VEC_A, VEC_B>(name, g, splits, stream);
  else launch_v4<Gemm, V4Small, VEC_A, VEC_B>(name, g, splits, stream);
}

// v5 takes v4's tiles (the same warps and mma tile counts; only the mma's k differs).
template <class Gemm, bool VEC_A, bool VEC_B>
void run_v5(const char* name, const Gemm& g, bool large, int splits, cudaStream_t stream) {
  if (large) launch_v5<Gemm, V4Large, VEC_A, VEC_B>(name, g, splits, stream);
  else launch_v5<Gemm, V4Small, VEC_A, VEC_B>(name, g, splits, stream);
}

}  // namespace

// Whether v6 can run on the current device: a Hopper GPU and a build holding its sm_90a code. One
// answer per device for the whole module (conv3x3.cu defines it); `stream` is the stream of the
// launch that asks, which must not be capturing a CUDA graph at the first question.
bool v6_available(cudaStream_t stream = nullptr);

namespace {

void check_v6_available(const char* name, cudaStream_t stream) {
  if (!v6_available(stream))
    throw std::runtime_error(std::string(name) +
                             ": v6_tf32_wgmma needs a Hopper GPU (compute capability 9.0) and a "
                             "build for sm_90a (UNET_CUDA_ARCH=90a); use v4_tf32_mma elsewhere");
}

template <class Gemm, class Tile, bool VEC_A, bool VEC_B>
void launch_v6(const char* name, const Gemm& g, int splits, cudaStream_t stream) {
  constexpr size_t kSmem = V6Layout<Gemm, Tile>::kSmemBytes;
  static_assert(kSmem <= 227 * 1024, "an SM of compute capability 9.0 gives a block 227 KB");
  constexpr auto kernel = conv3x3_v6_tf32_wgmma<Gemm, Tile, VEC_A, VEC_B>;
  check_v6_available(name, stream);
  allow_dynamic_smem<kernel>(kSmem, name);
  const dim3 grid = checked_grid(name, ceil_div<int64_t>(g.M, Tile::kBM),
                                 ceil_div<int64_t>(g.cols, Tile::kBN), splits);
  launch_kernel_smem(name, kernel, grid, dim3(kV6Threads), kSmem, stream, g);
}

// A weight-gradient view (K runs over pixels: conv3x3.cu's two, upconv.cu's one) says so with
// kWeightGradient; only those are built with v6's wide tile (weight_gemm_tile).
template <class Gemm, class = void>
struct IsWeightGradient : std::false_type {};
template <class Gemm>
struct IsWeightGradient<Gemm, std::void_t<decltype(Gemm::kWeightGradient)>>
    : std::bool_constant<Gemm::kWeightGradient> {};

// v6's tiles (gemm_tile, weight_gemm_tile): 128 x 128; where the output has at most 64 columns
// (the 64-channel layers), 256 x 64 (v6_rows) or 128 x 64; the weight gradients' 128 x 256 and
// 64 x 192; and, where a measured plan takes it (gemm_tiles), the output GEMMs' 256 x 128.
template <class Gemm, bool VEC_A, bool VEC_B>
void run_v6(const char* name, const Gemm& g, const GemmTile& tile, int splits, cudaStream_t stream) {
  if (tile.bm == V6Square::kBM && tile.bn == V6Square::kBN)
    return launch_v6<Gemm, V6Square, VEC_A, VEC_B>(name, g, splits, stream);
  if (tile.bm == V6Tall::kBM && tile.bn == V6Tall::kBN)
    return launch_v6<Gemm, V6Tall, VEC_A, VEC_B>(name, g, splits, stream);
  if (tile.bm == V6Narrow::kBM && tile.bn == V6Narrow::kBN)
    return launch_v6<Gemm, V6Narrow, VEC_A, VEC_B>(name, g, splits, stream);
  if constexpr (!IsWeightGradient<Gemm>::value) {
    if (tile.bm == V6Big::kBM && tile.bn == V6Big::kBN)
      return launch_v6<Gemm, V6Big, VEC_A, VEC_B>(name, g, splits, stream);
  }
  if constexpr (IsWeightGradient<Gemm>::value) {
    if (tile.bm == V6Wide::kBM && tile.bn == V6Wide::kBN)
      return launch_v6<Gemm, V6Wide, VEC_A, VEC_B>(name, g, splits, stream);
    if (tile.bm == V6Rows64::kBM && tile.bn == V6Rows64::kBN)
      return launch_v6<Gemm, V6Rows64, VEC_A, VEC_B>(name, g, splits, stream);
  }
  throw std::logic_error(std::string(name) + ": v6 has no " + std::to_string(tile.bm) + " x " +
                         std::to_string(tile.bn) + " tile for this view");
}

template <class Gemm, bool VEC_A, bool VEC_B>
void launch_tensor_core(const char* name, const Gemm& g, Conv3x3Version version,
                        const GemmTile& tile, int splits, cudaStream_t stream) {
  if (version == Conv3x3Version::kV4Tf32Mma) run_v4<Gemm, VEC_A, VEC_B>(name, g, tile.large, splits, stream);
  else if (version == Conv3x3Version::kV5Bf16Mma) run_v5<Gemm, VEC_A, VEC_B>(name, g, tile.large, splits, stream);
  else run_v6<Gemm, VEC_A, VEC_B>(name, g, tile, splits, stream);
}

// A GEMM view with a GEMM version (v3-v6) in the tile its planner chose, `splits` K slices: 16-byte
// copies of A (B) where the view allows them (Gemm::kVecA, kVecB) and the caller found the sizes
// and pointer aligned.
template <class Gemm>
void launch_gemm(const std::string& name, const Gemm& g, Conv3x3Version version,
                 const GemmTile& tile, int splits, bool vec_a, bool vec_b, cudaStream_t stream) {
  switch (version) {
    case Conv3x3Version::kV3Igemm:
      if constexpr (IsTapMajor<Gemm>::value) {
        throw std::logic_error(name + ": the tap-major views serve v4-v6 only");
      } else {
        run_v3(name.c_str(), g, tile.large, splits, stream);
        return;
      }
    case Conv3x3Version::kV4Tf32Mma:
    case Conv3x3Version::kV5Bf16Mma:
    case Conv3x3Version::kV6Tf32Wgmma:
      if constexpr (IsTapMajor<Gemm>::value) {  // B: rearranged weights, rows a multiple of 32 floats
        if (!vec_b) throw std::logic_error(name + ": the tap-major weights are not aligned");
        return launch_tensor_core<Gemm, false, true>(name.c_str(), g, version, tile, splits, stream);
      } else {
        if constexpr (Gemm::kVecA) {
          if (vec_a) return launch_tensor_core<Gemm, true, false>(name.c_str(), g, version, tile, splits, stream);
        }
        if constexpr (Gemm::kVecB) {
          if (vec_b) return launch_tensor_core<Gemm, false, true>(name.c_str(), g, version, tile, splits, stream);
        }
        return launch_tensor_core<Gemm, false, false>(name.c_str(), g, version, tile, splits, stream);
      }
    default:
      throw std::logic_error(name + ": not a GEMM version");
  }
}

// k_tiles: K in tiles of kV6BK (v6's tall tile needs a few).
GemmTile gemm_tile(Conv3x3Version version, int64_t M, int64_t cols, int64_t k_tiles) {
  static_assert(kV5BK == kV4BK, "v5 takes v4's tiles and K step");
  if (version == Conv3x3Version::kV6Tf32Wgmma) {  // "large": the 128-column tile
    const bool wide = cols > 64;
    const int bm = v6_rows(wide, M, k_tiles);
    return {wide, bm, wide ? 128 : 64, kV6BK, wide || bm == kV6TallBM ? kSMs : 0};
  }
  if (version == Conv3x3Version::kV3Igemm) {
    const bool large = use_large_tile<V3Large, V3Small>(M, cols);
    return {large, large ? V3Large::kBM : V3Small::kBM, large ? V3Large::kBN : V3Small::kBN, kV3BK};
  }
  const bool large = use_large_tile<V4Large, V4Small>(M, cols);
  return {large, large ? V4Large::kBM : V4Small::kBM, large ? V4Large::kBN : V4Small::kBN, kV4BK};
}

// A split of the forward's or the backward data's K sums at least this many k: its partial tile
// costs a write and a read of 4 x BM x BN bytes.
constexpr int64_t kMinSplitK = 512;

// Forward and backward data: the tile, and K split only where the output tiles are too few.
struct OutputPlan {
  GemmTile tile;
  int splits;
};

// The K slices of an output GEMM (or v7's and v8's convolutions) of `tiles` block tiles over
// `outputs` elements and a sum of K: one, unless the tiles are too few to fill the GPU; then
// enough for two waves, at least kMinSplitK of K each, balanced over whole waves of `wave_blocks`.
int output_splits(int64_t tiles, int64_t K, int64_t outputs, int64_t wave_blocks) {
  if (tiles <= 0 || tiles >= kTargetBlocks) return 1;
  int64_t s = ceil_div(kTargetBlocks, tiles);
  s = std::min(s, K / kMinSplitK);
  s = std::min(s, kMaxSplits);
  s = std::min(s, kMaxSplitWorkspaceBytes / (4 * std::max<int64_t>(outputs, 1)));
  return static_cast<int>(wave_balanced_splits(tiles, std::max<int64_t>(s, 1), wave_blocks));
}

OutputPlan plan_output(Conv3x3Version version, int64_t M, int64_t cols, int64_t K) {
  const GemmTile tile = gemm_tile(version, M, cols, ceil_div<int64_t>(K, kV6BK));
  const int64_t tiles = ceil_div<int64_t>(M, tile.bm) * ceil_div<int64_t>(cols, tile.bn);
  return {tile, output_splits(tiles, K, M * cols, tile.wave_blocks)};
}

// A weight gradient summed in `splits` slices of K: launch(out) with out = dw itself for one slice,
// else a workspace of the slices' partials [splits, count], which conv3x3_split_k_reduce then adds
// into dw in slice order (deterministic).
template <class Launch>
void with_split_partials(float* dw, int64_t count, int splits, cudaStream_t stream, Launch launch) {
  Workspace workspace(splits > 1 ? splits * count : 0, stream, "conv3x3 split-K workspace");
  launch(splits > 1 ? workspace.data() : dw);
  if (splits > 1)
    launch_kernel("conv3x3_split_k_reduce", conv3x3_split_k_reduce, dim3(grid_1d(count)),
                  dim3(kBlock1d), stream, static_cast<const float*>(workspace.data()), dw, count,
                  splits);
}

// The tile of a weight-gradient GEMM. v6: gemm_tile's, except the wide 128 x 256 tile (V6Wide)
// where the columns are a whole number of 256 (no partial column tile wastes its larger products);
// one block per SM, like the 128 x 128 tile (147 KB of shared memory, up to 255 registers). With
// 64 rows or fewer the 64 x 192 tile comes first where the columns allow (below); otherwise the
// 128-row tiles, wide or not, leave one warpgroup multiplying padding.
// v4 and v5: the 128 x 128 tile wherever rows and columns both fill more than half of it. These
// GEMMs split K (the pixels) to fill the GPU, so the large tile need not make enough blocks by
// itself, as gemm_tile asks of it for the output GEMMs, which split K only as a last resort.
// The rule it replaces left the 64 x 64 tile to every weight gradient but b1's and b2's, which
// ran at 44-63 TFLOP/s in v5 (H100, 53cf464) against 59-75 for b1 and b2 and 84-113 for v5's
// large-tile forwards; per FLOP the small tile reads twice the bytes. v3 keeps gemm_tile's rule:
// its weight gradients ran at 15-19 TFLOP/s in either tile.
// v6 also takes the 64 x 192 tile (V6Rows64) where M is at most 64 and the columns a whole number
// of 192: one block per SM too (128 KB).
GemmTile weight_gemm_tile(Conv3x3Version version, int64_t M, int64_t cols, int64_t k_tiles) {
  if (version == Conv3x3Version::kV6Tf32Wgmma && cols > 0 && M <= V6Rows64::kBM &&
      cols % V6Rows64::kBN == 0)
    return {true, V6Rows64::kBM, V6Rows64::kBN, V6Rows64::kBK, kSMs};
  if (version == Conv3x3Version::kV6Tf32Wgmma && cols > 0 && cols % V6Wide::kBN == 0)
    return {true, V6Wide::kBM, V6Wide::kBN, V6Wide::kBK, kSMs};
  if ((version == Conv3x3Version::kV4Tf32Mma || version == Conv3x3Version::kV5Bf16Mma) &&
      M > V4Small::kBM && cols > V4Small::kBN)
    return {true, V4Large::kBM, V4Large::kBN, kV4BK};
  return gemm_tile(version, M, cols, k_tiles);
}

// The plan of a weight-gradient GEMM (M x cols outputs, K = images x pixels per image, walked in
// slices of the tile's bk that never straddle two images): the tile, and how many slices of K.
struct WeightGemmPlan {
  GemmTile tile;
  int splits;
};

WeightGemmPlan plan_weight_gemm(Conv3x3Version version, int64_t M, int64_t cols, int64_t images,
                                int64_t pixels) {
  const GemmTile tile = weight_gemm_tile(version, M, cols, images * ceil_div<int64_t>(pixels, kV6BK));
  const int64_t tiles = ceil_div<int64_t>(M, tile.bm) * ceil_div<int64_t>(cols, tile.bn);
  const int64_t units = images * ceil_div<int64_t>(pixels, tile.bk);
  return {tile, plan_splits(tiles, units, tile.bk, M * cols, tile.wave_blocks)};
}

// The versions with a kernel of their own for the forward and backward data (conv3x3_halo.cuh).
bool is_halo_version(Conv3x3Version version) {
  return version == Conv3x3Version::kV7Tf32Halo || version == Conv3x3Version::kV8Bf16Halo ||
         version == Conv3x3Version::kV9Fp32Halo;
}

// The GEMM version an op of `version` runs its GEMMs with: v7 runs v6's, v8 v5's and v9 v3's (the
// same precision) wherever their own kernel (conv3x3_halo.cuh) does not apply; every other
// version its own.
Conv3x3Version gemm_version(Conv3x3Version version) {
  if (version == Conv3x3Version::kV7Tf32Halo) return Conv3x3Version::kV6Tf32Wgmma;
  if (version == Conv3x3Version::kV8Bf16Halo) return Conv3x3Version::kV5Bf16Mma;
  if (version == Conv3x3Version::kV9Fp32Halo) return Conv3x3Version::kV3Igemm;
  return version;
}

// The versions whose ops are GEMMs of the views above: v3-v6 (what the plan table knows).
bool is_gemm_version(Conv3x3Version version) {
  return version == Conv3x3Version::kV3Igemm || version == Conv3x3Version::kV4Tf32Mma ||
         version == Conv3x3Version::kV5Bf16Mma || version == Conv3x3Version::kV6Tf32Wgmma;
}

const char* version_name(Conv3x3Version version) {
  for (const Conv3x3VersionName& v : kConv3x3Versions)
    if (v.version == version) return v.name;
  return "unknown";
}

// =================================================================================================
// Plans by measurement (launchers.h, "Plans measured instead of ruled"): the plans a version
// offers a GEMM, the rule's among them, and the choice of one by timing each.
// =================================================================================================

bool is_weight_gradient_op(const std::string& op) {
  const std::string tail = "_backward_weight";
  return op.size() > tail.size() && op.compare(op.size() - tail.size(), tail.size(), tail) == 0;
}

// The block tiles a version offers an M x cols GEMM: v3's, v4's and v5's large and small ones;
// v6's 128 x 128 and 128 x 64, its 256 x 64 for the forward and backward data of more than 128
// rows, and its 256 x 128 where they have more than 64 columns too; for the weight gradients its 128 x 256 and 64 x 192 where weight_gemm_tile would take
// them (columns a whole number of 256; at most 64 rows and columns a whole number of 192).
std::vector<GemmTile> gemm_tiles(Conv3x3Version version, bool weight, int64_t M, int64_t cols) {
  switch (version) {
    case Conv3x3Version::kV3Igemm:
      return {{true, V3Large::kBM, V3Large::kBN, kV3BK}, {false, V3Small::kBM, V3Small::kBN, kV3BK}};
    case Conv3x3Version::kV4Tf32Mma:
    case Conv3x3Version::kV5Bf16Mma:
      return {{true, V4Large::kBM, V4Large::kBN, kV4BK}, {false, V4Small::kBM, V4Small::kBN, kV4BK}};
    case Conv3x3Version::kV6Tf32Wgmma: {
      std::vector<GemmTile> tiles{{true, V6Square::kBM, V6Square::kBN, kV6BK, kSMs},
                                  {false, V6Narrow::kBM, V6Narrow::kBN, kV6BK, 0}};
      if (!weight && M > kV6BM) tiles.push_back({false, V6Tall::kBM, V6Tall::kBN, kV6BK, kSMs});
      if (!weight && M > kV6BM && cols > V6Narrow::kBN)
        tiles.push_back({true, V6Big::kBM, V6Big::kBN, V6Big::kBK, kSMs});
      if (weight && cols % V6Wide::kBN == 0)
        tiles.push_back({true, V6Wide::kBM, V6Wide::kBN, V6Wide::kBK, kSMs});
      if (weight && M <= V6Rows64::kBM && cols % V6Rows64::kBN == 0)
        tiles.push_back({true, V6Rows64::kBM, V6Rows64::kBN, V6Rows64::kBK, kSMs});
      return tiles;
    }
    default:
      return {};
  }
}

// Checks a key (launchers.h) and says whether it names a weight gradient.
bool check_gemm_plan_key(const GemmPlanKey& key) {
  bool known = false;
  for (const char* op : kGemmPlanOps) known = known || key.op == op;
  if (!known) {
    std::string ops;
    for (const char* op : kGemmPlanOps) ops += std::string(ops.empty() ? "" : ", ") + op;
    throw std::invalid_argument("GEMM plan: no op " + key.op + " has GEMM plans; those that do: " +
                                ops);
  }
  if (is_halo_version(key.version))
    throw std::invalid_argument(
        std::string("GEMM plan: ") + version_name(key.version) + "'s forward and backward data "
        "run its own kernel, which has no plans, and its other ops the GEMMs of " +
        version_name(gemm_version(key.version)) + ": name that version for those");
  if (!is_gemm_version(key.version))
    throw std::invalid_argument(std::string("GEMM plan: ") + version_name(key.version) +
                                " runs no GEMM; only v3_igemm to v6_tf32_wgmma have plans");
  const bool weight = is_weight_gradient_op(key.op);
  const std::string dims = "; got M " + std::to_string(key.M) + ", cols " +
                           std::to_string(key.cols) + ", K " + std::to_string(key.K) +
                           ", images " + std::to_string(key.images);
  if (key.M < 1 || key.cols < 1 || key.K < 1 || key.images < 1 || (!weight && key.images != 1))
    throw std::invalid_argument("GEMM plan of " + key.op + ": needs M, cols, K >= 1 and images " +
                                (weight ? ">= 1" : "= 1 (only a weight gradient sums over images)") +
                                dims);
  // Bounds that keep the planners' products (4 M cols bytes of partials, images x K) in 64 bits;
  // every GEMM the launchers run is far inside them.
  constexpr int64_t kMaxDim = INT32_MAX, kMaxProduct = int64_t{1} << 60;
  if (key.M > kMaxDim || key.cols > kMaxDim || key.K > kMaxDim || key.images > kMaxDim ||
      key.M * key.cols > kMaxProduct || key.images * key.K > kMaxProduct)
    throw std::invalid_argument("GEMM plan of " + key.op + ": M, cols, K and images must be below "
                                "2^31, M x cols and images x K at most 2^60" + dims);
  return weight;
}

GemmPlan plan_of(const GemmTile& tile, int splits) { return {tile.bm, tile.bn, splits}; }
bool same_plan(const GemmPlan& a, const GemmPlan& b) {
  return a.bm == b.bm && a.bn == b.bn && a.splits == b.splits;
}

// The rule's plan (plan_output, plan_weight_gemm) and its tile.
GemmTile gemm_rule_tile(const GemmPlanKey& key, bool weight, int* splits) {
  if (weight) {
    const WeightGemmPlan plan = plan_weight_gemm(key.version, key.M, key.cols, key.images, key.K);
    *splits = plan.splits;
    return plan.tile;
  }
  const OutputPlan plan = plan_output(key.version, key.M, key.cols, key.K);
  *splits = plan.splits;
  return plan.tile;
}

// A slice of a measured plan sums at least this many k (pixels, in a weight gradient): half the
// rules' kMinSplitK, a quarter of their kMinSplitPixels. The rules' floors guess where a split stops
// paying; timing need not guess, and the rules leave some GEMMs far short of the 132 SMs: the
// paper's up-convolutions' weight gradients get 32 to 64 blocks by rule (the wide tile; sums of
// 784 to 38,416 pixels split once per 1024 pixels at most, 1 to 37 slices).
constexpr int64_t kMeasuredMinSplitK = 256;
static_assert(kMeasuredMinSplitK >= V6Big::kBK && kMeasuredMinSplitK >= kV6BK,
              "a slice of the output GEMMs holds whole K tiles");

// The most slices a plan in `tile` may take: a slice sums at least kMeasuredMinSplitK k or pixels
// (and at least one K tile), at most kMaxSplits slices and the workspace, at most four times
// kTargetBlocks blocks.
int64_t most_splits(const GemmPlanKey& key, bool weight, const GemmTile& tile) {
  const int64_t tiles = ceil_div<int64_t>(key.M, tile.bm) * ceil_div<int64_t>(key.cols, tile.bn);
  int64_t s = std::min(kMaxSplits, std::max<int64_t>(4 * kTargetBlocks / tiles, 1));
  s = std::min(s, kMaxSplitWorkspaceBytes / (4 * key.M * key.cols));
  if (weight) {
    const int64_t units = key.images * ceil_div<int64_t>(key.K, tile.bk);
    s = std::min({s, units, units * tile.bk / kMeasuredMinSplitK});
  } else {
    s = std::min(s, key.K / kMeasuredMinSplitK);
  }
  return std::max<int64_t>(s, 1);
}

// The split counts tried in every tile, up to most_splits.
constexpr int kSplitLadder[] = {1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128};

std::vector<GemmPlan> gemm_plans(const GemmPlanKey& key) {
  const bool weight = check_gemm_plan_key(key);
  int rule_splits = 1;
  const GemmTile rule_tile = gemm_rule_tile(key, weight, &rule_splits);
  std::vector<GemmPlan> plans{plan_of(rule_tile, rule_splits)};
  for (const GemmTile& tile : gemm_tiles(key.version, weight, key.M, key.cols)) {
    // a tile whose grid passes CUDA's limits is not offered (checked_grid would refuse it)
    if (ceil_div<int64_t>(key.M, tile.bm) > kMaxGridX || ceil_div<int64_t>(key.cols, tile.bn) > kMaxGridYZ)
      continue;
    const int64_t most = std::min(most_splits(key, weight, tile), kMaxGridYZ);
    for (int s : kSplitLadder)
      if (s <= most && !same_plan(plan_of(tile, s), plans.front()))
        plans.push_back(plan_of(tile, s));
  }
  return plans;
}

// The tile of a plan of this key (one of gemm_plans') whose tile is not the rule's, for the
// launchers (run_planned_gemm takes the rule's own tile as it is).
GemmTile gemm_plan_tile(const GemmPlanKey& key, const GemmPlan& plan) {
  for (const GemmTile& tile : gemm_tiles(key.version, is_weight_gradient_op(key.op), key.M, key.cols))
    if (tile.bm == plan.bm && tile.bn == plan.bn) return tile;
  throw std::logic_error(key.op + ": " + version_name(key.version) + " has no " +
                         std::to_string(plan.bm) + " x " + std::to_string(plan.bn) + " tile here");
}

// Whether `stream` is being captured into a CUDA graph (where nothing may synchronise).
bool stream_capturing(cudaStream_t stream) {
#ifdef UNET_CPU_EMULATION
  (void)stream;
  return false;
#else
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  const cudaError_t err = cudaStreamIsCapturing(stream, &status);
  if (err == cudaErrorStreamCaptureImplicit) {  // the legacy stream while another one captures
    cudaGetLastError();
    return true;
  }
  CUDA_CHECK(err, "GEMM plan timing: cudaStreamIsCapturing");
  return status != cudaStreamCaptureStatusNone;
#endif
}

// Timed runs of a plan, after one untimed run that warms up (and fails early); the median is its
// time. The CPU emulation, whose times mean nothing, runs each plan once more only.
#ifdef UNET_CPU_EMULATION
constexpr int kTunedRuns = 1;
#else
constexpr int kTunedRuns = 5;
#endif

// The median time of one run of `run`, in ms, measured on `stream` between events around each run
// (the CPU emulation times its own synchronous runs).
template <class Run>
double time_gemm_plan(Run&& run, cudaStream_t stream) {
  run();
  double ms[kTunedRuns];
#ifdef UNET_CPU_EMULATION
  (void)stream;
  for (int i = 0; i < kTunedRuns; ++i) {
    const auto start = std::chrono::steady_clock::now();
    run();
    ms[i] = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  }
#else
  struct Events {
    cudaEvent_t at[kTunedRuns + 1] = {};
    ~Events() {
      for (cudaEvent_t e : at)
        if (e) cudaEventDestroy(e);
    }
  } events;
  for (cudaEvent_t& e : events.at) CUDA_CHECK(cudaEventCreate(&e), "GEMM plan timing");
  CUDA_CHECK(cudaEventRecord(events.at[0], stream), "GEMM plan timing");
  for (int i = 0; i < kTunedRuns; ++i) {
    run();
    CUDA_CHECK(cudaEventRecord(events.at[i + 1], stream), "GEMM plan timing");
  }
  CUDA_CHECK(cudaEventSynchronize(events.at[kTunedRuns]), "GEMM plan timing");
  for (int i = 0; i < kTunedRuns; ++i) {
    float took = 0.0f;
    CUDA_CHECK(cudaEventElapsedTime(&took, events.at[i], events.at[i + 1]), "GEMM plan timing");
    ms[i] = took;
  }
#endif
  std::sort(ms, ms + kTunedRuns);
  return ms[kTunedRuns / 2];
}

// The plan a GEMM runs: the table's entry for its key; else the rule's with autotuning off; else,
// outside a CUDA graph capture, the fastest of gemm_plans(key), each run by execute(plan) (which
// must overwrite the GEMM's outputs: it runs several times), entered in the table. Inside a
// capture, where nothing may synchronise, the rule's plan is entered untimed instead, so that the
// eager calls after it run the plan the graph holds. A plan whose partials do not fit in memory
// is left out (the rule's, never); any other error ends the call, as it would with that plan.
template <class Execute>
GemmPlan chosen_gemm_plan(const GemmPlanKey& key, const GemmPlan& rule, cudaStream_t stream,
                          Execute&& execute) {
  GemmPlan plan = rule;
  if (find_tuned_gemm_plan(key, &plan) || !gemm_autotune()) return plan;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  if (stream_capturing(stream)) {
    record_tuned_gemm_plan({key, rule, rule, nan, nan, 0, 0, {}}, false);
    find_tuned_gemm_plan(key, &plan);  // the entry's plan, whichever thread entered it
    return plan;
  }
  const std::lock_guard<std::mutex> tuning(gemm_tuning_mutex());
  if (find_tuned_gemm_plan(key, &plan)) return plan;  // another thread tuned it meanwhile
  TunedGemmPlan tuned{key, rule, rule, std::numeric_limits<double>::infinity(), nan, 0, 0, {}};
  for (const GemmPlan& candidate : gemm_plans(key)) {
    const bool is_rule = same_plan(candidate, rule);
    double ms = 0.0;
    try {
      ms = time_gemm_plan([&] { execute(candidate); }, stream);
    } catch (const WorkspaceAllocationError&) {
      if (is_rule) throw;
      continue;
    }
    ++tuned.candidates;
    tuned.timed.emplace_back(candidate, ms);
    if (is_rule) tuned.rule_ms = ms;
    if (ms < tuned.ms) {
      tuned.ms = ms;
      tuned.plan = candidate;
    }
  }
  record_tuned_gemm_plan(tuned, false);
  find_tuned_gemm_plan(key, &plan);
  return plan;
}

// Runs one GEMM in the plan chosen for it (chosen_gemm_plan), the rule's being `rule_tile` in
// `rule_splits` slices: run(tile, splits) launches it in a plan. A plan in the rule's tile runs
// that tile as it is; only another plan's tile is looked up (gemm_plan_tile).
template <class Run>
void run_planned_gemm(const GemmPlanKey& key, const GemmTile& rule_tile, int rule_splits,
                      cudaStream_t stream, Run&& run) {
  const GemmPlan rule = plan_of(rule_tile, rule_splits);
  const auto execute = [&](const GemmPlan& plan) {
    const bool rule_tile_plan = plan.bm == rule.bm && plan.bn == rule.bn;
    run(rule_tile_plan ? rule_tile : gemm_plan_tile(key, plan), plan.splits);
  };
  execute(chosen_gemm_plan(key, rule, stream, execute));
}

// An output view `g` computed with its K in `splits` slices: launch(view) with g itself for one
// slice; else with SplitPartialGemm, the slices' partials into a workspace, and then
// conv3x3_split_k_epilogue adding them in slice order through g's epilogue (deterministic). For the
// GEMM versions (run_output_gemm) and v7-v9 (conv3x3.cu, run_halo_conv).
template <class Gemm, class Launch>
void with_output_split(const std::string& op, const Gemm& g, int splits, cudaStream_t stream,
                       Launch&& launch) {
  if (splits == 1) {
    launch(g);
    return;
  }
  const int64_t count = g.M * g.cols;
  Workspace workspace(splits * count, stream, "conv3x3 split-K workspace");
  launch(SplitPartialGemm<Gemm>{g, workspace.data()});
  const std::string epilogue = op + "_split_k_epilogue";
  launch_kernel(epilogue.c_str(), conv3x3_split_k_epilogue<Gemm>, dim3(grid_1d(count)),
                dim3(kBlock1d), stream, g, static_cast<const float*>(workspace.data()), splits);
}

// Forward or backward data through a GEMM version (v3-v6), for the plain view or its concatenated
// twin. `op` and the version name make the kernel's name in errors, e.g.
// "conv3x3_forward_v4_tf32_mma". The plan: run_planned_gemm's, whose rule (plan_output) splits K
// only where the output tiles are too few.
template <class Gemm>
void run_output_gemm(const std::string& op, const Gemm& g, Conv3x3Version version, bool vec_b,
                     cudaStream_t stream) {
  const std::string name = op + "_" + version_name(version);
  const OutputPlan rule = plan_output(version, g.M, g.cols, g.K);
  run_planned_gemm({op, version, g.M, g.cols, g.K, 1}, rule.tile, rule.splits, stream,
                   [&](const GemmTile& tile, int splits) {
    with_output_split(op, g, splits, stream, [&](const auto& view) {
      launch_gemm(name, view, version, tile, splits, false, vec_b, stream);
    });
  });
}

// A weight gradient (K over the pixels of `images` images of `pixels` each) through a GEMM
// version, into dw (`count` elements): launch(out, tile, splits) launches its view summing into
// `out`, which is dw itself for one slice, else a workspace of the slices' partials that
// conv3x3_split_k_reduce adds into dw in slice order (with_split_partials). The plan:
// run_planned_gemm's, whose rule is plan_weight_gemm.
template <class Launch>
void run_weight_gemm(const std::string& op, Conv3x3Version version, int64_t M, int64_t cols,
                     int64_t images, int64_t pixels, float* dw, int64_t count, cudaStream_t stream,
                     Launch&& launch) {
  const WeightGemmPlan rule = plan_weight_gemm(version, M, cols, images, pixels);
  run_planned_gemm({op, version, M, cols, pixels, images}, rule.tile, rule.splits, stream,
                   [&](const GemmTile& tile, int splits) {
    with_split_partials(dw, count, splits, stream, [&](float* out) { launch(out, tile, splits); });
  });
}

}  // namespace

}  // namespace unet
