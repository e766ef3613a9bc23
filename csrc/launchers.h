// launchers.h: every kernel launcher of unet_cuda, one per op (docs/OPS.md names the ops).
//
// Conventions shared by all of them:
// * Arrays are device pointers to C-contiguous float32 (labels int32, masks and argmax uint8).
//   Activations are NCHW, weights OIHW, biases [O]; strides are implied by the dimensions.
// * Dimensions are passed as int; the launchers index in int64_t.
// * Outputs are written completely (no launcher relies on the output's previous contents, except
//   the in-place ops accumulate and sgd_momentum_update).
// * Each launcher picks grid, block and shared memory, launches on `stream`, and throws
//   std::runtime_error if the launch fails. Arguments are validated by the caller (bindings.cpp).
// * Results are deterministic: no float atomics; every reduction runs in a fixed order.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace unet {

// conv3x3.cu: valid 3x3 cross-correlation, stride 1. x[N,C,H,W], w[O,C,3,3], b[O],
// y and dy [N,O,H-2,W-2]. H and W are always the input's (dx's) size.
//
// The kernel versions (docs/CONV3X3.md), one registry: the bindings turn a name into the enum
// once, and each launcher dispatches on it. v1-v3 and v9 compute in FP32, v4, v6 and v7 in TF32,
// v5 and v8 in bf16 (v6-v8 only on sm_90a: Hopper; all with FP32 sums; every buffer stays
// float32). v7, v8 and v9 have kernels of their own for the forward and the backward data (plain
// and concatenated), v9 for the weight gradients too, and run the GEMMs of v6 (v7), v5 (v8) or v3
// (v9) for everything else (v7's and v8's weight gradients, the up-convolutions, the first layer).
enum class Conv3x3Version {
  kV1Direct, kV2Smem, kV3Igemm, kV4Tf32Mma, kV5Bf16Mma, kV6Tf32Wgmma, kV7Tf32Halo, kV8Bf16Halo,
  kV9Fp32Halo
};
struct Conv3x3VersionName {
  const char* name;
  Conv3x3Version version;
};
inline constexpr Conv3x3VersionName kConv3x3Versions[] = {
    {"v1_direct", Conv3x3Version::kV1Direct},
    {"v2_smem", Conv3x3Version::kV2Smem},
    {"v3_igemm", Conv3x3Version::kV3Igemm},
    {"v4_tf32_mma", Conv3x3Version::kV4Tf32Mma},
    {"v5_bf16_mma", Conv3x3Version::kV5Bf16Mma},
    {"v6_tf32_wgmma", Conv3x3Version::kV6Tf32Wgmma},
    {"v7_tf32_halo", Conv3x3Version::kV7Tf32Halo},
    {"v8_bf16_halo", Conv3x3Version::kV8Bf16Halo},
    {"v9_fp32_halo", Conv3x3Version::kV9Fp32Halo},
};
// Whether `version` can run on the current device: v6, v7 and v8 need a Hopper GPU and a build
// with sm_90a code (asked once per device); every other version runs on any GPU of the build.
bool conv3x3_version_available(Conv3x3Version version);
// The version the bindings use when none is named (unet_cuda.ops.cuda keeps its own setting).
inline constexpr const char* kConv3x3DefaultVersion = "v1_direct";

void launch_conv3x3_forward(const float* x, const float* w, const float* b, float* y, int N, int C,
                            int H, int W, int O, bool relu, Conv3x3Version version,
                            cudaStream_t stream);
// relu_mask (null, or shaped as dx; the backward-data launchers of every conv family and the
// max-pool's backward take one): dx is zero wherever relu_mask <= 0. Passing the op's input x when
// x is a ReLU's output fuses that ReLU's backward into this op: the result has the bits of
// relu_backward(x, dx), with no pass of its own.
void launch_conv3x3_backward_data(const float* dy, const float* w, const float* relu_mask,
                                  float* dx, int N, int C, int H, int W, int O,
                                  Conv3x3Version version, cudaStream_t stream);
void launch_conv3x3_backward_weight(const float* x, const float* dy, float* dw, float* db, int N,
                                    int C, int H, int W, int O, Conv3x3Version version,
                                    cudaStream_t stream);
// The convolution of a concatenated input [up, centre crop of skip] (never stored), as the
// decoder's first convolution of each level: up[N,Cu,H,W], skip[N,Cs,Hs,Ws] (Hs-H, Ws-W even and
// >= 0; crop offset ((Hs-H)/2, (Ws-W)/2)), w[O,Cu+Cs,3,3]; the gradient of the input comes back as
// dup[N,Cu,H,W] and dskip[N,Cs,Hs,Ws] (0 outside the crop window). Only the GEMM versions (v3-v6)
// and v7, v8 read two inputs: conv3x3_fuses_concat says which; the others throw.
bool conv3x3_fuses_concat(Conv3x3Version version);
void launch_conv3x3_concat_forward(const float* up, const float* skip, const float* w,
                                   const float* b, float* y, int N, int Cu, int Cs, int H, int W,
                                   int Hs, int Ws, int O, bool relu, Conv3x3Version version,
                                   cudaStream_t stream);
// up_mask / skip_mask: relu_mask for dup and for dskip (null, or shaped as up / skip).
void launch_conv3x3_concat_backward_data(const float* dy, const float* w, const float* up_mask,
                                         const float* skip_mask, float* dup, float* dskip, int N,
                                         int Cu, int Cs, int H, int W, int Hs, int Ws, int O,
                                         Conv3x3Version version, cudaStream_t stream);
void launch_conv3x3_concat_backward_weight(const float* up, const float* skip, const float* dy,
                                           float* dw, float* db, int N, int Cu, int Cs, int H,
                                           int W, int Hs, int Ws, int O, Conv3x3Version version,
                                           cudaStream_t stream);
// How many slices (split-K) the weight gradient of `version` sums separately for these shapes,
// then adds in slice order; 1 for v1_direct. A function of the shapes only, never of the GPU.
// These four functions report the planners' rules; a GEMM with a measured plan (below) runs that.
int conv3x3_backward_weight_splits(Conv3x3Version version, int N, int C, int H, int W, int O);
// The columns of the block tile its GEMM versions take (the columns being 9C: 128 or 64; v6's
// 256 where 9C is a whole number of 256), 0 where no GEMM runs (v1, v2, the few-channel kernel).
int conv3x3_backward_weight_tile_columns(Conv3x3Version version, int N, int C, int H, int W, int O);
// The same for the forward and the backward data of the GEMM versions (v3-v6) and v7, which split K only
// where the output tiles alone are too few to fill the GPU (the deep layers at batch 1); 1 for v1
// and v2. The concatenated-input ops plan as the plain ones with C = Cu + Cs.
int conv3x3_forward_splits(Conv3x3Version version, int N, int C, int H, int W, int O);
int conv3x3_backward_data_splits(Conv3x3Version version, int N, int C, int H, int W, int O);
// Whether a GEMM of `version` summing over `channels` channels (C for the forward, O for the
// backward data) walks K tap by tap (the tap-major views of conv3x3.cu), for images whose
// channels x pixels are under 2^31 elements (larger ones take the 64-bit views).
bool conv3x3_tap_major(Conv3x3Version version, int channels);

// Plans measured instead of ruled (docs/CONV3X3.md, "Plans by measurement"). Every GEMM of the
// GEMM versions (v3-v6: the 3x3 convolutions' three directions, plain and concatenated, and the
// up-convolutions') runs in a block tile with K in `splits` slices, which the planners choose
// from the shapes by fixed rules (the same plan, and the same bits, on every GPU). With autotuning
// on, the first call of each GEMM instead times every plan its version offers on the GPU at hand
// (cudaEvents, on the call's stream) and keeps the fastest in a table that later calls read, as
// cuDNN's benchmark mode does; inside a CUDA graph capture, where nothing may synchronise, the
// rule's plan enters the table untimed (the graph holds it). Tuning is serialised, and the first
// plan entered for a GEMM stays (but where set by hand). Plans sum in other orders: results change
// in their last bits between plans, never beyond the version's tolerance. The table can be read,
// saved and set again: the same plans, the same bits, for GEMMs of the same shapes and version.
//
// A GEMM is known by its op (e.g. "conv3x3_forward", "upconv2x2_backward_weight"), version, and
// dimensions: M rows, `cols` columns and K, the sum's length; for the weight gradients, whose K
// runs over the pixels of every image, K is the pixels of one image and `images` the images
// (1 for the other GEMMs).
struct GemmPlanKey {
  std::string op;
  Conv3x3Version version;
  int64_t M, cols, K, images;
};
struct GemmPlan {
  int bm, bn, splits;
};
struct TunedGemmPlan {
  GemmPlanKey key;
  GemmPlan plan;     // the plan its calls run
  GemmPlan rule;     // the planners' plan for it
  double ms;         // measured time of `plan` (NaN where set by hand, or entered in a capture)
  double rule_ms;    // and of `rule`
  int candidates;    // plans timed (0 where set by hand, or entered in a capture)
  int64_t uses;      // calls that ran `plan` from the table
  std::vector<std::pair<GemmPlan, double>> timed;  // every plan timed, with its time, in order
};
// The ops whose GEMMs have plans; a weight gradient's name ends in "_backward_weight".
inline constexpr const char* kGemmPlanOps[] = {
    "conv3x3_forward",        "conv3x3_backward_data",        "conv3x3_backward_weight",
    "conv3x3_concat_forward", "conv3x3_concat_backward_data", "conv3x3_concat_backward_weight",
    "upconv2x2_forward",      "upconv2x2_backward_data",      "upconv2x2_backward_weight"};
void set_gemm_autotune(bool enabled);
bool gemm_autotune();
// The rule's plan and every plan of the key's version (the rule's first); throws
// std::invalid_argument for an unknown op, a version that is not a GEMM version, dimensions
// below 1 or past the bounds (2^31 each, 2^60 for M x cols and images x K), or images other than 1
// for a GEMM that is no weight gradient.
GemmPlan gemm_plan_rule(const GemmPlanKey& key);
std::vector<GemmPlan> gemm_plan_candidates(const GemmPlanKey& key);
// The table: every entry, in key order; one entry set (the plan must be one of the key's
// candidates, else std::invalid_argument naming them); all entries cleared.
std::vector<TunedGemmPlan> tuned_gemm_plans();
void set_tuned_gemm_plan(const GemmPlanKey& key, const GemmPlan& plan);
void clear_tuned_gemm_plans();

// bias_backward.cu: db[o] = sum over n and the HW pixels of dy[n,o,:] (dy is [N,O,HW]); shared by
// the backward_weight launchers of every convolution (but conv1x1's for O <= 8, which sums db with
// dw).
void launch_bias_backward(const float* dy, float* db, int N, int O, int64_t HW,
                          cudaStream_t stream);

// conv1x1.cu: x[N,C,H,W], w[O,C,1,1], b[O], y and dy [N,O,H,W].
void launch_conv1x1_forward(const float* x, const float* w, const float* b, float* y, int N, int C,
                            int H, int W, int O, cudaStream_t stream);
void launch_conv1x1_backward_data(const float* dy, const float* w, const float* relu_mask,
                                  float* dx, int N, int C, int H, int W, int O,
                                  cudaStream_t stream);
void launch_conv1x1_backward_weight(const float* x, const float* dy, float* dw, float* db, int N,
                                    int C, int H, int W, int O, cudaStream_t stream);

// upconv.cu: 2x2 stride-2 transposed convolution. x[N,C,H,W], w[O,C,2,2], b[O],
// y and dy [N,O,2H,2W]. H and W are the input's size. `version`: the conv3x3 version of the
// precision mode; the GEMM versions (v3-v6) run upconv as a GEMM too (v7: v6's, v8: v5's), v1 and
// v2 the direct kernels.
void launch_upconv2x2_forward(const float* x, const float* w, const float* b, float* y, int N,
                              int C, int H, int W, int O, Conv3x3Version version,
                              cudaStream_t stream);
void launch_upconv2x2_backward_data(const float* dy, const float* w, const float* relu_mask,
                                    float* dx, int N, int C, int H, int W, int O,
                                    Conv3x3Version version, cudaStream_t stream);
void launch_upconv2x2_backward_weight(const float* x, const float* dy, float* dw, float* db, int N,
                                      int C, int H, int W, int O, Conv3x3Version version,
                                      cudaStream_t stream);

// maxpool.cu: 2x2 stride-2 max-pool. x and dx [N,C,H,W] with H, W even; y, dy, argmax
// [N,C,H/2,W/2]; argmax = 2*dy + dx of the window element taken (first maximum wins).
void launch_maxpool2x2_forward(const float* x, float* y, uint8_t* argmax, int N, int C, int H,
                               int W, cudaStream_t stream);
// relu_mask here (null, or shaped as dy): the pool's output y, where its input x is a ReLU's
// output. dx is then zero where y <= 0 too: the bits of relu_backward(x, dx), since x at the
// element taken is y, and every other element of dx is zero anyway. accumulate: dx += the
// gradient (dx read and written), the bits of accumulate_(dx, gradient).
void launch_maxpool2x2_backward(const float* dy, const uint8_t* argmax, const float* relu_mask,
                                float* dx, bool accumulate, int N, int C, int H, int W,
                                cudaStream_t stream);

// crop_concat.cu: y[N,Cu+Cs,H,W] = [up[N,Cu,H,W], centre crop of skip[N,Cs,Hs,Ws]];
// Hs-H and Ws-W even and >= 0. The backward splits dy into dup and dskip (zero outside the crop).
void launch_crop_concat_forward(const float* up, const float* skip, float* y, int N, int Cu, int H,
                                int W, int Cs, int Hs, int Ws, cudaStream_t stream);
void launch_crop_concat_backward(const float* dy, float* dup, float* dskip, int N, int Cu, int H,
                                 int W, int Cs, int Hs, int Ws, cudaStream_t stream);

// elementwise.cu: n elements each.
void launch_relu_backward(const float* y, const float* dy, float* dx, int64_t n,
                          cudaStream_t stream);
void launch_accumulate(float* dst, const float* src, int64_t n, cudaStream_t stream);

// softmax_xent.cu: logits and probs [N,K,H,W], labels int32 [N,H,W], weights [N,H,W], loss a
// single float (the weighted mean over the N*H*W pixels, reduced on the device in a fixed order).
void launch_softmax_xent_forward(const float* logits, const int32_t* labels, const float* weights,
                                 float* loss, float* probs, int N, int K, int H, int W,
                                 cudaStream_t stream);
void launch_softmax_xent_backward(const float* probs, const int32_t* labels, const float* weights,
                                  float* dlogits, float dloss, int N, int K, int H, int W,
                                  cudaStream_t stream);

// dropout.cu: n elements each; mask from the splitmix64 hash of docs/OPS.md (1 keeps); the
// forward and the backward both scale the kept elements by 1 / (1 - p). The mask's seed is `seed`,
// or, when seed_on_device is not null, the uint64 it points to, read when the kernel runs (so that
// a captured CUDA graph replays with the value written there since).
void launch_dropout_mask(uint8_t* mask, int64_t n, double p, uint64_t seed,
                         const uint64_t* seed_on_device, cudaStream_t stream);
void launch_dropout_forward(const float* x, const uint8_t* mask, float* y, int64_t n, double p,
                            cudaStream_t stream);
void launch_dropout_backward(const float* dy, const uint8_t* mask, float* dx, int64_t n, double p,
                             cudaStream_t stream);
// The mask of launch_dropout_mask (same p, same seed) applied where it is hashed, never stored:
// y = x * mask / (1 - p). The forward (x -> y) and the backward (dy -> dx) of seeded dropout.
void launch_dropout_seeded(const float* x, float* y, int64_t n, double p, uint64_t seed,
                           const uint64_t* seed_on_device, cudaStream_t stream);

// optimizer.cu: Caffe's SGD with momentum, in place on n elements:
// v = momentum * v + lr * (grad + weight_decay * param); param -= v. The rate is `lr`, or, when
// lr_on_device is not null, the float32 it points to, read when the kernel runs (CUDA graphs).
void launch_sgd_momentum_update(float* param, const float* grad, float* velocity, int64_t n,
                                float lr, const float* lr_on_device, float momentum,
                                float weight_decay, cudaStream_t stream);
// The same update of `count` parameters (params[i], grads[i], velocities[i] of sizes[i] elements)
// in one launch per 32 of them; the same bits as launch_sgd_momentum_update on each.
void launch_sgd_momentum_update_multi(float* const* params, const float* const* grads,
                                      float* const* velocities, const int64_t* sizes, int count,
                                      float lr, const float* lr_on_device, float momentum,
                                      float weight_decay, cudaStream_t stream);

// warp.cu: the augmentation warp of docs/OPS.md. image, weights, image_out, weights_out float32
// [H,W]; labels, labels_out int32 [H,W]; coarse float32 [2,grid_y,grid_x] node displacements (px).
// quarter_turns in 0..3 (H == W when odd), gamma > 0; all three outputs in one pass.
void launch_augment_warp(const float* image, const int32_t* labels, const float* weights,
                         const float* coarse, float* image_out, int32_t* labels_out,
                         float* weights_out, int H, int W, int grid_y, int grid_x,
                         int quarter_turns, bool flip_rows, bool flip_columns, double gamma,
                         double contrast, double brightness, cudaStream_t stream);

}  // namespace unet
