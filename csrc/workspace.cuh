// workspace.cuh: device scratch memory taken and given back in stream order, for the kernels that
// need a workspace (split-K partials, rearranged weights, the slices of the sliced reductions).
//
// Everything here is constexpr or in an anonymous namespace: one copy per translation unit.
#pragma once

#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common.cuh"

namespace unet {

// Per-device state (the memory pool's setting, kernel attributes, the v6 probe) covers this many
// devices.
constexpr int kMaxDevices = 64;

namespace {

// The device's default memory pool (where cudaMallocAsync takes the workspaces) gives freed memory
// back to the system at every synchronisation unless told to keep some: the trainer synchronises
// every step (it reads the loss), so each step would map its workspaces anew. Keep up to 1 GiB,
// set once per device at the first workspace, an eager step (a CUDA graph is captured after one).
constexpr uint64_t kWorkspacePoolKeepBytes = uint64_t{1} << 30;

void keep_workspace_memory() {
  static std::atomic<bool> done[kMaxDevices] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) {
    cudaGetLastError();  // no device to configure: the allocation itself will report it
    return;
  }
  if (done[device].load()) return;
  cudaMemPool_t pool;
  uint64_t keep = kWorkspacePoolKeepBytes;
  if (cudaDeviceGetDefaultMemPool(&pool, device) != cudaSuccess ||
      cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep) != cudaSuccess)
    cudaGetLastError();  // only a speed matter: leave no error behind for the next launch check
  done[device].store(true);
}

// What a Workspace throws when its allocation fails (no CUDA error is left pending): the plans by
// measurement (implicit_gemm.cuh, chosen_gemm_plan) skip a plan whose partials do not fit.
struct WorkspaceAllocationError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// `floats` floats of device memory, allocated and freed in stream order on `stream`; `what` names
// it in the error thrown when the allocation fails (a WorkspaceAllocationError).
class Workspace {
 public:
  Workspace(int64_t floats, cudaStream_t stream, const char* what) : stream_(stream) {
    if (floats <= 0) return;
    keep_workspace_memory();
    const cudaError_t err =
        cudaMallocAsync(&ptr_, static_cast<size_t>(floats) * sizeof(float), stream);
    if (err != cudaSuccess) {
      ptr_ = nullptr;
      cudaGetLastError();  // the error is thrown here, not left for the next op's launch check
      throw WorkspaceAllocationError(std::string(what) + ": cudaMallocAsync of " +
                                     std::to_string(floats * sizeof(float)) + " bytes failed: " +
                                     cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
    }
  }
  ~Workspace() {
    if (ptr_ != nullptr && cudaFreeAsync(ptr_, stream_) != cudaSuccess) cudaGetLastError();
  }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  float* data() const { return static_cast<float*>(ptr_); }

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_;
};

}  // namespace

}  // namespace unet
