// cuda_runtime.h for the CPU emulation of csrc/conv3x3.cu (tests/test_conv3x3_emulated.py).
//
// Compiled with g++ in place of the CUDA runtime header (this folder comes first on the include
// path), it lets the kernels of csrc/conv3x3.cu and csrc/bias_backward.cu run unchanged on the
// CPU, so that their index arithmetic, bounds guards, tiling, split-K and mma fragment layouts are
// checked against the NumPy reference on machines without a GPU.
//
// How a launch runs: the blocks of the grid one after another; within a block, one fiber
// (ucontext) per CUDA thread, all on the calling OS thread. A fiber runs until it reaches a barrier
// (__syncthreads, or the warp-wide exchange of mma.sync and __shfl_down_sync), where it yields to
// the next runnable fiber. So:
//   * __shared__ arrays (static storage here) are shared by the threads of the running block;
//   * a missing __syncthreads shows: a fiber runs far ahead of the others between barriers;
//   * a __syncthreads that not every thread reaches is reported as a deadlock;
//   * cp.async copies are deferred to the cp.async.wait_group that retires them, so a read of
//     shared memory before the wait sees stale data, as it could on the GPU;
//   * mma.sync.m16n8k8 (TF32) gathers the fragments of the 32 lanes by the PTX ISA layout and
//     multiplies the TF32 values (low 13 bits dropped) exactly, summing in double; likewise
//     mma.sync.m16n8k16 (bf16 pairs, rounded to nearest even by pack_bf16x2);
//   * dynamic shared memory (extern __shared__) is a per-launch buffer, NaN at each block's start;
//   * wgmma.mma_async (TF32 or bf16, operands in unswizzled K-major shared memory) is a warpgroup-wide
//     rendezvous that records the product; wgmma.wait_group runs the retired products, reading
//     shared memory then, so a tile overwritten before its wait shows;
//   * cudaMallocAsync fills the new memory with NaN bytes, so unwritten workspace shows.
// Only what conv3x3.cu and its includes use is provided.
#pragma once

#define UNET_CPU_EMULATION 1

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
struct alignas(8) float2 {
  float x, y;
};

using cudaStream_t = struct CUstream_st*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorMemoryAllocation = 2 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorName(cudaError_t e) {
  return e == cudaSuccess ? "cudaSuccess" : "cudaError";
}
inline const char* cudaGetErrorString(cudaError_t e) { return cudaGetErrorName(e); }
inline cudaError_t cudaMallocAsync(void** p, size_t bytes, cudaStream_t) {
  *p = std::malloc(bytes > 0 ? bytes : 1);
  if (*p == nullptr) return cudaErrorMemoryAllocation;
  std::memset(*p, 0xFF, bytes);  // NaN in every float
  return cudaSuccess;
}
inline cudaError_t cudaFreeAsync(void* p, cudaStream_t) {
  std::free(p);
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
using cudaMemPool_t = struct CUmemPoolHandle_st*;
enum cudaStreamCaptureStatus { cudaStreamCaptureStatusNone = 0 };
enum cudaMemPoolAttr { cudaMemPoolAttrReleaseThreshold = 4 };
inline cudaError_t cudaDeviceGetDefaultMemPool(cudaMemPool_t* pool, int) {
  *pool = nullptr;
  return cudaSuccess;
}
inline cudaError_t cudaMemPoolSetAttribute(cudaMemPool_t, cudaMemPoolAttr, void*) {
  return cudaSuccess;
}
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
// The limit on dynamic shared memory that a kernel may raise itself to (an H100's, per block).
constexpr int kMaxDynamicSharedBytes = 227 * 1024;
template <typename Kernel>
inline cudaError_t cudaFuncSetAttribute(Kernel, cudaFuncAttribute, int value) {
  return value <= kMaxDynamicSharedBytes ? cudaSuccess : cudaErrorInvalidValue;
}

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

namespace cpu_emulation {

constexpr size_t kStackBytes = 256 * 1024;

// A rendezvous of `expected` fibers: the last to arrive opens the next generation.
struct Barrier {
  int expected = 0;
  int arrived = 0;
  unsigned generation = 0;
};

struct Copy {
  void* dst;
  const void* src;
  size_t bytes;
};

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  uint3 thread_idx{};
  bool done = false;
  const Barrier* waiting_on = nullptr;  // blocked until its generation moves past `waiting_gen`
  unsigned waiting_gen = 0;
  std::vector<std::vector<Copy>> copy_groups{1};  // cp.async groups; the last one is open
};

// Warp-wide exchange area: two slots used alternately, so that a slot is never rewritten before
// every lane has read it (a lane reuses a slot only after the barrier of the next exchange).
struct WarpExchange {
  Barrier barrier;
  int slot = 0;
  uint32_t a[2][32][4];
  uint32_t b[2][32][2];
  double value[2][32];
};

// One wgmma.mma_async of a warpgroup, run when a wgmma.wait_group retires its group: the operands
// are read from shared memory then (the latest moment the GPU may read them), so a kernel that
// overwrites a tile before waiting for the products that read it gets wrong results here too.
struct WgmmaOp {
  uint64_t desc_a, desc_b;
  int n;                  // the instruction's N (rows of B)
  bool accumulate;        // scale-d: D = A B + D, or D = A B
  bool bf16 = false;      // .bf16 operands, k16 (else .tf32, k8)
  float* d[128];          // each thread's accumulator registers (N/2 of them)
};

struct WarpgroupState {
  Barrier barrier;
  std::vector<WgmmaOp> open;                  // issued since the last commit
  std::vector<std::vector<WgmmaOp>> groups;   // committed, not yet retired
  WgmmaOp staged{};                           // filled by the 128 threads of one instruction
  uint64_t staged_desc[128][2];               // each thread's descriptors: they must agree
  bool staged_accumulate[128];
};

struct BlockState {
  dim3 grid, block;
  uint3 block_idx{};
  std::vector<Fiber> fibers;
  Barrier block_barrier;
  std::vector<WarpExchange> warps;
  std::vector<WarpgroupState> warpgroups;
  int current = -1;
  ucontext_t scheduler;
  std::function<void()>* body = nullptr;
  std::vector<float4> dynamic_shared;  // extern __shared__: the launch's bytes, 16-byte aligned
};

inline BlockState*& state() {
  static BlockState* s = nullptr;
  return s;
}
inline Fiber& self() { return state()->fibers[state()->current]; }

// Yields until `b` opens the generation after `gen`.
inline void wait(const Barrier& b, unsigned gen) {
  Fiber& f = self();
  f.waiting_on = &b;
  f.waiting_gen = gen;
  swapcontext(&f.context, &state()->scheduler);
}

inline void arrive_and_wait(Barrier& b) {
  const unsigned gen = b.generation;
  if (++b.arrived == b.expected) {
    b.arrived = 0;
    ++b.generation;
    return;
  }
  wait(b, gen);
}

inline void sync_block() { arrive_and_wait(state()->block_barrier); }

// The dynamic shared memory of the running block (NaN bytes at the start of every block, so that
// a read before any write shows).
template <typename T>
inline T* dynamic_shared() {
  return reinterpret_cast<T*>(state()->dynamic_shared.data());
}

inline int lane_id() { return static_cast<int>(self().thread_idx.x % 32); }
inline WarpExchange& my_warp() { return state()->warps[self().thread_idx.x / 32]; }

// The lanes of a warp meet after each wrote its part into slot `w.slot` of the exchange; the last
// to arrive flips the slot for the next exchange (the slot just written stays readable meanwhile).
inline void warp_meet(WarpExchange& w) {
  const unsigned gen = w.barrier.generation;
  if (++w.barrier.arrived == w.barrier.expected) {
    w.barrier.arrived = 0;
    ++w.barrier.generation;
    w.slot ^= 1;
  } else {
    wait(w.barrier, gen);
  }
}

template <typename T>
inline T shfl_down(T v, unsigned delta) {
  WarpExchange& w = my_warp();
  const int slot = w.slot;
  const int lane = lane_id();
  w.value[slot][lane] = static_cast<double>(v);
  warp_meet(w);
  const int src = lane + static_cast<int>(delta);
  return src < w.barrier.expected ? static_cast<T>(w.value[slot][src]) : v;
}

// ---- The instructions csrc/conv3x3.cu writes in PTX ----

inline uint32_t to_tf32(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7f800000u) == 0x7f800000u) return u;  // Inf, NaN: unchanged
  u += 0x1000u;                                     // half of the 13 dropped bits: ties away
  return u & 0xffffe000u;
}

inline double tf32_value(uint32_t u) {
  u &= 0xffffe000u;  // the tensor core reads 19 bits
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// What every emulated mma.sync 16 x 8 x K has in common: the 32 lanes publish their fragments and
// meet; then each lane sums its four elements of D = A B + D (rows g, g, g+8, g+8, columns 2t,
// 2t+1, 2t, 2t+1, with g = lane / 4, t = lane % 4), reading A[r][k] and B[k][n] from the published
// fragments through the instruction's layout, `a_of(fragments, r, k)` and `b_of(fragments, k, n)`.
template <int K, typename AOf, typename BOf>
inline void mma_sync_16x8(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], AOf a_of,
                          BOf b_of) {
  WarpExchange& w = my_warp();
  if (w.barrier.expected != 32) throw std::logic_error("mma.sync needs a full warp");
  const int slot = w.slot;
  const int lane = lane_id();
  std::memcpy(w.a[slot][lane], a, sizeof a);
  std::memcpy(w.b[slot][lane], b, sizeof b);
  warp_meet(w);  // expected is 32, checked above
  const int g = lane / 4, t = lane % 4;
  const int rows[4] = {g, g, g + 8, g + 8};
  const int cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
  for (int q = 0; q < 4; ++q) {
    double sum = d[q];
    for (int k = 0; k < K; ++k) sum += a_of(w.a[slot], rows[q], k) * b_of(w.b[slot], k, cols[q]);
    d[q] = static_cast<float>(sum);
  }
}

// mma.sync.m16n8k8 .tf32. A[r][k]: lane 4*(r%8) + k%4 holds it, in register (r >= 8) + 2*(k >= 4);
// B[k][n]: lane 4*n + k%4, register (k >= 4).
inline void mma_tf32_m16n8k8(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  mma_sync_16x8<8>(
      d, a, b,
      [](const uint32_t (*fa)[4], int r, int k) {
        return tf32_value(fa[4 * (r % 8) + k % 4][(r >= 8) + 2 * (k >= 4)]);
      },
      [](const uint32_t (*fb)[2], int k, int n) { return tf32_value(fb[4 * n + k % 4][k >= 4]); });
}

// ---- Hopper's warpgroup MMA (wgmma), TF32 operands from shared memory ----

// The shared-memory address of a pointer into the dynamic shared memory, as __cvta_generic_to_shared
// gives it (here: the offset from the start of the dynamic shared memory).
inline uint32_t shared_address(const void* p) {
  const char* base = reinterpret_cast<const char*>(state()->dynamic_shared.data());
  const std::ptrdiff_t offset = reinterpret_cast<const char*>(p) - base;
  const std::ptrdiff_t size = static_cast<std::ptrdiff_t>(state()->dynamic_shared.size() * 16);
  if (offset < 0 || offset >= size)
    throw std::logic_error("shared_address: the pointer is not in the dynamic shared memory");
  return static_cast<uint32_t>(offset);
}

inline WarpgroupState& my_warpgroup() { return state()->warpgroups[self().thread_idx.x / 128]; }

// All threads of the warpgroup meet; the last to arrive runs `last` before the others go on.
template <typename Last>
inline void warpgroup_rendezvous(Last last) {
  WarpgroupState& wg = my_warpgroup();
  if (wg.barrier.expected != 128) throw std::logic_error("wgmma needs a full warpgroup of 128 threads");
  const unsigned gen = wg.barrier.generation;
  if (++wg.barrier.arrived == 128) {
    last(wg);
    wg.barrier.arrived = 0;
    ++wg.barrier.generation;
  } else {
    wait(wg.barrier, gen);
  }
}

inline void wgmma_fence() {}          // orders register accesses: nothing to do in one thread
template <int R>
inline void wgmma_fence_operands(float (&)[R]) {}  // a compiler barrier on the GPU
inline void fence_proxy_async() {}    // makes shared-memory writes visible to the async proxy

inline double bf16_value(uint32_t h);

// Element (row, k) of a K-major, unswizzled operand (PTX ISA: canonical layout
// ((8,m),(T,2k)):((1T,SBO),(1,LBO)) with T elements of `bytes` each in 16 bytes: 4 TF32, 8 bf16):
// rows of a core matrix 16 bytes apart, 8-row groups SBO bytes apart, 16-byte chunks of k LBO
// bytes apart. TF32 is read as the tensor core reads it, the upper 19 bits (truncation).
inline double wgmma_operand(uint64_t desc, int row, int k, int bytes) {
  if ((desc >> 62) != 0) throw std::logic_error("emulated wgmma: only the unswizzled layout is supported");
  const uint32_t start = static_cast<uint32_t>(desc & 0x3FFF) << 4;
  const uint32_t lbo = static_cast<uint32_t>((desc >> 16) & 0x3FFF) << 4;
  const uint32_t sbo = static_cast<uint32_t>((desc >> 32) & 0x3FFF) << 4;
  const int t = 16 / bytes;
  const uint32_t byte = start + (row % 8) * 16 + (row / 8) * sbo + (k / t) * lbo + (k % t) * bytes;
  const size_t size = state()->dynamic_shared.size() * 16;
  if (byte + bytes > size) throw std::logic_error("emulated wgmma reads past the dynamic shared memory");
  uint32_t u = 0;
  std::memcpy(&u, reinterpret_cast<const char*>(state()->dynamic_shared.data()) + byte, bytes);
  return bytes == 2 ? bf16_value(u) : tf32_value(u);
}

inline void run_wgmma(const WgmmaOp& op) {
  // D[m][n], m < 64, n < N: thread 32 (m / 16) + 4 (m % 8) + (n % 8) / 2, register
  // 4 (n / 8) + 2 ((m % 16) / 8) + n % 2 (PTX ISA, "wgmma .m64nNk8" accumulator fragments).
  for (int m = 0; m < 64; ++m)
    for (int n = 0; n < op.n; ++n) {
      const int thread = 32 * (m / 16) + 4 * (m % 8) + (n % 8) / 2;
      float& d = op.d[thread][4 * (n / 8) + 2 * ((m % 16) / 8) + n % 2];
      double sum = op.accumulate ? d : 0.0;
      const int bytes = op.bf16 ? 2 : 4;  // k16 of bf16, or k8 of TF32
      for (int k = 0; k < 32 / bytes; ++k)
        sum += wgmma_operand(op.desc_a, m, k, bytes) * wgmma_operand(op.desc_b, n, k, bytes);
      d = static_cast<float>(sum);
    }
}

template <int N>
inline void issue_wgmma(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, bool accumulate, bool bf16) {
  const int t = static_cast<int>(self().thread_idx.x % 128);
  WarpgroupState& mine = my_warpgroup();
  mine.staged.d[t] = d;
  mine.staged_desc[t][0] = desc_a;
  mine.staged_desc[t][1] = desc_b;
  mine.staged_accumulate[t] = accumulate;
  warpgroup_rendezvous([&](WarpgroupState& wg) {
    for (int i = 0; i < 128; ++i)  // .aligned: every thread issues the same instruction
      if (wg.staged_desc[i][0] != desc_a || wg.staged_desc[i][1] != desc_b ||
          wg.staged_accumulate[i] != accumulate)
        throw std::logic_error("wgmma: the threads of a warpgroup passed different operands");
    wg.staged.desc_a = desc_a;
    wg.staged.desc_b = desc_b;
    wg.staged.n = N;
    wg.staged.accumulate = accumulate;
    wg.staged.bf16 = bf16;
    wg.open.push_back(wg.staged);
  });
}

template <int N>
inline void wgmma_tf32(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
  issue_wgmma<N>(d, desc_a, desc_b, accumulate, false);
}
template <int N>
inline void wgmma_bf16(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
  issue_wgmma<N>(d, desc_a, desc_b, accumulate, true);
}

inline void wgmma_commit() {
  warpgroup_rendezvous([](WarpgroupState& wg) {
    wg.groups.push_back(std::move(wg.open));
    wg.open.clear();
  });
}

template <int kPending>
inline void wgmma_wait() {
  warpgroup_rendezvous([](WarpgroupState& wg) {
    while (static_cast<int>(wg.groups.size()) > kPending) {
      for (const WgmmaOp& op : wg.groups.front()) run_wgmma(op);
      wg.groups.erase(wg.groups.begin());
    }
  });
}

// Round to nearest even to bf16 (the upper 16 bits of a float32), as cvt.rn.bf16x2.f32 does.
inline uint32_t to_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u;  // NaN stays (a quiet) NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return u >> 16;
}

inline uint32_t pack_bf16x2(float lo, float hi) { return to_bf16(lo) | (to_bf16(hi) << 16); }

inline double bf16_value(uint32_t h) {
  const uint32_t u = (h & 0xffffu) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// mma.sync.m16n8k16 .bf16: pairs of consecutive k per register, the lower k in the low half, the
// bf16 products summed exactly in double. A[r][k]: lane 4*(r%8) + (k%8)/2, register
// (r >= 8) + 2*(k >= 8), half k%2; B[k][n]: lane 4*n + (k%8)/2, register (k >= 8), half k%2.
inline double bf16_half(uint32_t reg, int k) { return bf16_value(k % 2 ? reg >> 16 : reg); }

inline void mma_bf16_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  mma_sync_16x8<16>(
      d, a, b,
      [](const uint32_t (*fa)[4], int r, int k) {
        return bf16_half(fa[4 * (r % 8) + (k % 8) / 2][(r >= 8) + 2 * (k >= 8)], k);
      },
      [](const uint32_t (*fb)[2], int k, int n) {
        return bf16_half(fb[4 * n + (k % 8) / 2][k >= 8], k);
      });
}

inline void cp_async_4(float* dst, const float* src) {
  self().copy_groups.back().push_back({dst, src, 4});
}
inline void cp_async_16(float* dst, const float* src) {
  if (reinterpret_cast<std::uintptr_t>(dst) % 16 || reinterpret_cast<std::uintptr_t>(src) % 16)
    throw std::logic_error("cp.async of 16 bytes needs 16-byte aligned addresses");
  self().copy_groups.back().push_back({dst, src, 16});
}
// The zero-filling forms: `copy` false reads nothing (src must still be given) and, like a copy,
// writes the zeros only when the group is waited for.
inline void cp_async_4_or_zero(float* dst, const float* src, bool copy) {
  static const float zeros[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  if (src == nullptr) throw std::logic_error("cp.async needs a source address even when it copies none");
  self().copy_groups.back().push_back({dst, copy ? static_cast<const void*>(src) : zeros, 4});
}
inline void cp_async_16_or_zero(float* dst, const float* src, bool copy) {
  static const float zeros[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  if (src == nullptr) throw std::logic_error("cp.async needs a source address even when it copies none");
  // The source must be aligned even where nothing is read (copy false, src-size 0): PTX requires
  // the address aligned to the copy size either way.
  if (reinterpret_cast<std::uintptr_t>(dst) % 16 || reinterpret_cast<std::uintptr_t>(src) % 16)
    throw std::logic_error("cp.async of 16 bytes needs 16-byte aligned addresses");
  self().copy_groups.back().push_back({dst, copy ? static_cast<const void*>(src) : zeros, 16});
}
inline void cp_async_commit() { self().copy_groups.emplace_back(); }
template <int kPending>
inline void cp_async_wait() {
  std::vector<std::vector<Copy>>& groups = self().copy_groups;
  const int committed = static_cast<int>(groups.size()) - 1;
  for (int i = 0; i < committed - kPending; ++i) {
    for (const Copy& c : groups.front()) std::memcpy(c.dst, c.src, c.bytes);
    groups.erase(groups.begin());
  }
}

// ---- Launch ----

inline void fiber_main() {
  BlockState* s = state();
  (*s->body)();
  Fiber& f = s->fibers[s->current];
  f.done = true;
  swapcontext(&f.context, &s->scheduler);
}

inline void run_block(BlockState& s) {
  const int threads = static_cast<int>(s.fibers.size());
  for (int i = 0; i < threads; ++i) {
    Fiber& f = s.fibers[i];
    f.done = false;
    f.waiting_on = nullptr;
    f.copy_groups.assign(1, {});
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.get();
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_main, 0);
  }
  int remaining = threads;
  while (remaining > 0) {
    bool progressed = false;
    for (int i = 0; i < threads; ++i) {
      Fiber& f = s.fibers[i];
      if (f.done) continue;
      if (f.waiting_on != nullptr) {
        if (f.waiting_on->generation == f.waiting_gen) continue;  // still blocked
        f.waiting_on = nullptr;
      }
      s.current = i;
      swapcontext(&s.scheduler, &f.context);
      progressed = true;
      if (f.done) --remaining;
    }
    if (!progressed)
      throw std::runtime_error(
          "emulated kernel deadlocked: some threads wait at a barrier that the others never reach");
  }
  for (const Fiber& f : s.fibers) {
    for (const std::vector<Copy>& g : f.copy_groups)
      if (!g.empty())
        throw std::runtime_error("a kernel ended with cp.async copies never waited for");
  }
  if (s.block_barrier.arrived != 0)
    throw std::runtime_error("a kernel ended with threads still inside __syncthreads");
  for (const WarpgroupState& wg : s.warpgroups)
    if (!wg.open.empty() || !wg.groups.empty())
      throw std::runtime_error("a kernel ended with wgmma products never waited for");
}

template <typename... Params>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t dynamic_shared_bytes,
            Params... args) {
  if (dynamic_shared_bytes > static_cast<size_t>(kMaxDynamicSharedBytes))
    throw std::runtime_error("launch asks for more dynamic shared memory than a block may have");
  BlockState s;
  s.grid = grid;
  s.block = block;
  const size_t dynamic_shared_floats4 = (dynamic_shared_bytes + 15) / 16;
  const int threads = static_cast<int>(block.x * block.y * block.z);
  s.fibers.resize(threads);
  for (int i = 0; i < threads; ++i) {
    s.fibers[i].stack.reset(new char[kStackBytes]);
    s.fibers[i].thread_idx = {i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
  }
  s.block_barrier.expected = threads;
  s.warps.resize((threads + 31) / 32);
  for (int w = 0; w < static_cast<int>(s.warps.size()); ++w)
    s.warps[w].barrier.expected = std::min(32, threads - 32 * w);
  s.warpgroups.resize((threads + 127) / 128);
  for (int g = 0; g < static_cast<int>(s.warpgroups.size()); ++g)
    s.warpgroups[g].barrier.expected = std::min(128, threads - 128 * g);
  std::tuple<Params...> params(args...);
  std::function<void()> body = [&] { std::apply(kernel, params); };
  s.body = &body;
  BlockState* previous = state();
  state() = &s;
  try {
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          s.block_idx = {x, y, z};
          s.dynamic_shared.assign(dynamic_shared_floats4, make_float4(NAN, NAN, NAN, NAN));
          run_block(s);
        }
  } catch (...) {
    state() = previous;
    throw;
  }
  state() = previous;
}

}  // namespace cpu_emulation

#define threadIdx (::cpu_emulation::self().thread_idx)
#define blockIdx (::cpu_emulation::state()->block_idx)
#define blockDim (::cpu_emulation::state()->block)
#define gridDim (::cpu_emulation::state()->grid)
#define __syncthreads() ::cpu_emulation::sync_block()
template <typename T>
inline T __shfl_down_sync(unsigned, T v, unsigned delta) {
  return ::cpu_emulation::shfl_down(v, delta);
}
