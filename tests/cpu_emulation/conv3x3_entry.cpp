// conv3x3_entry.cpp: C entry points to the launchers of csrc/conv3x3.cu and csrc/upconv.cu (the
// two users of csrc/implicit_gemm.cuh; their bias gradients from csrc/bias_backward.cu), and of
// csrc/conv1x1.cu, csrc/dropout.cu, csrc/elementwise.cu, csrc/maxpool.cu and csrc/optimizer.cu,
// built for the CPU
// emulation (cuda_runtime.h beside this file), called through ctypes by
// tests/test_conv3x3_emulated.py. Each returns 0, or -1 with the error message in `error`.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>
#include <vector>

#include "launchers.h"

namespace {

bool parse_version(const char* name, unet::Conv3x3Version* version) {
  for (const unet::Conv3x3VersionName& v : unet::kConv3x3Versions)
    if (std::strcmp(name, v.name) == 0) {
      *version = v.version;
      return true;
    }
  return false;
}

template <typename Call>
int guarded(const char* version_name, char* error, int error_size, Call call) {
  unet::Conv3x3Version version;
  try {
    if (!parse_version(version_name, &version))
      throw std::runtime_error(std::string("unknown version ") + version_name);
    call(version);
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(error, error_size, "%s", e.what());
    return -1;
  }
}

template <typename Call>
int guarded_plain(char* error, int error_size, Call call) {
  try {
    call();
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(error, error_size, "%s", e.what());
    return -1;
  }
}

}  // namespace

extern "C" {

int emulated_conv3x3_forward(const char* version, const float* x, const float* w, const float* b,
                             float* y, int N, int C, int H, int W, int O, int relu, char* error,
                             int error_size) {
  return guarded(version, error, error_size, [&](unet::Conv3x3Version v) {
    unet::launch_conv3x3_forward(x, w, b, y, N, C, H, W, O, relu != 0, v, nullptr);
  });
}

int emulated_conv3x3_backward_data(const char* version, const float* dy, const float* w,
                                   const float* relu_mask, float* dx, int N, int C, int H, int W,
                                   int O, char* error, int error_size) {
  return guarded(version, error, error_size, [&](unet::Conv3x3Version v) {
    unet::launch_conv3x3_backward_data(dy, w, relu_mask, dx, N, C, H, W, O, v, nullptr);
  });
}

int emulated_conv3x3_backward_weight(const char* version, const float* x, const float* dy,
                                     float* dw, float* db, int N, int C, int H, int W, int O,
                                     char* error, int error_size) {
  return guarded(version, error, error_size, [&](unet::Conv3x3Version v) {
    unet::launch_conv3x3_backward_weight(x, dy, dw, db, N, C, H, W, O, v, nullptr);
  });
}

int emulated_conv3x3_concat_forward(const char* version, const float* up, const float* skip,
                                    const float* w, const float* b, float* y, int N, int Cu,
                                    int Cs, int H, int W, int Hs, int Ws, int O, int relu,
                                    char* error, int error_size) {
  return guarded(version, error, error_size, [&](unet::Conv3x3Version v) {
    unet::launch_conv3x3_concat_forward(up, skip, w, b, y, N, Cu, Cs, H, W, Hs, Ws, O, relu != 0,
                                        v, nullptr);
  });
}

int emulated_conv3x3_concat_backward_data(const char* version, const float* dy, const float* w,
                                          const float* up_mask, const float* skip_mask,
                                          float* dup, float* dskip, int N, int Cu, int Cs, int H,
                                          int W, int Hs, int Ws, int O, char* error,
                                          int error_size) {
  return guarded(version, error, error_size, [&](unet::Conv3x3Version v) {
    unet::launch_conv3x3_concat_backward_data(dy, w, up_mask, skip_mask, dup, dskip, N, Cu, Cs, H,
                                              W, Hs, Ws, O, v, nullptr);
  });
}

int emulated_conv3x3_concat_backward_weight(const char* version, const float* up,
                                            const float* skip, const float* dy, float* dw,
                                            float* db, int N, int Cu, int Cs, int H, int W, int Hs,
                                            int Ws, int O, char* error, int error_size) {
  return guarded(version, error, error_size, [&](unet::Conv3x3Version v) {
    unet::launch_conv3x3_concat_backward_weight(up, skip, dy, dw, db, N, Cu, Cs, H, W, Hs, Ws, O,
                                                v, nullptr);
  });
}

int emulated_conv3x3_backward_weight_splits(const char* version, int N, int C, int H, int W,
                                            int O) {
  unet::Conv3x3Version v;
  if (!parse_version(version, &v)) return -1;
  return unet::conv3x3_backward_weight_splits(v, N, C, H, W, O);
}

int emulated_conv3x3_backward_weight_tile_columns(const char* version, int N, int C, int H, int W,
                                                  int O) {
  unet::Conv3x3Version v;
  if (!parse_version(version, &v)) return -1;
  return unet::conv3x3_backward_weight_tile_columns(v, N, C, H, W, O);
}

int emulated_conv3x3_tap_major(const char* version, int channels) {
  unet::Conv3x3Version v;
  if (!parse_version(version, &v)) return -1;
  return unet::conv3x3_tap_major(v, channels) ? 1 : 0;
}

int emulated_conv3x3_forward_splits(const char* version, int N, int C, int H, int W, int O) {
  unet::Conv3x3Version v;
  if (!parse_version(version, &v)) return -1;
  return unet::conv3x3_forward_splits(v, N, C, H, W, O);
}

int emulated_conv3x3_backward_data_splits(const char* version, int N, int C, int H, int W, int O) {
  unet::Conv3x3Version v;
  if (!parse_version(version, &v)) return -1;
  return unet::conv3x3_backward_data_splits(v, N, C, H, W, O);
}

// The measured plans of the GEMMs (launchers.h, "Plans measured instead of ruled").
void emulated_set_gemm_autotune(int enabled) { unet::set_gemm_autotune(enabled != 0); }

void emulated_clear_tuned_gemm_plans() { unet::clear_tuned_gemm_plans(); }

// The table, one line per entry: op version M cols K images bm bn splits rule_bm rule_bn
// rule_splits candidates uses. Returns the bytes needed (more than `size`: the text was cut).
int emulated_tuned_gemm_plans(char* text, int size) {
  std::string lines;
  for (const unet::TunedGemmPlan& t : unet::tuned_gemm_plans()) {
    const char* version = "?";
    for (const unet::Conv3x3VersionName& v : unet::kConv3x3Versions)
      if (v.version == t.key.version) version = v.name;
    char line[256];
    std::snprintf(line, sizeof line, "%s %s %lld %lld %lld %lld %d %d %d %d %d %d %d %lld\n",
                  t.key.op.c_str(), version, static_cast<long long>(t.key.M),
                  static_cast<long long>(t.key.cols), static_cast<long long>(t.key.K),
                  static_cast<long long>(t.key.images), t.plan.bm, t.plan.bn, t.plan.splits,
                  t.rule.bm, t.rule.bn, t.rule.splits, t.candidates,
                  static_cast<long long>(t.uses));
    lines += line;
  }
  std::snprintf(text, size, "%s", lines.c_str());
  return static_cast<int>(lines.size()) + 1;
}

// The key's plans as (bm, bn, splits) triples in `plans` (room for `most`); returns their number.
int emulated_gemm_plan_candidates(const char* op, const char* version, int64_t M, int64_t cols,
                                  int64_t K, int64_t images, int* plans, int most, char* error,
                                  int error_size) {
  int count = 0;
  const int status = guarded(version, error, error_size, [&](unet::Conv3x3Version v) {
    const std::vector<unet::GemmPlan> all =
        unet::gemm_plan_candidates({op, v, M, cols, K, images});
    for (const unet::GemmPlan& p : all) {
      if (count < most) {
        plans[3 * count] = p.bm;
        plans[3 * count + 1] = p.bn;
        plans[3 * count + 2] = p.splits;
      }
      ++count;
    }
  });
  return status == 0 ? count : -1;
}

int emulated_set_tuned_gemm_plan(const char* op, const char* version, int64_t M, int64_t cols,
                                 int64_t K, int64_t images, int bm, int bn, int splits,
                                 char* error, int error_size) {
  return guarded(version, error, error_size, [&](unet::Conv3x3Version v) {
    unet::set_tuned_gemm_plan({op, v, M, cols, K, images}, {bm, bn, splits});
  });
}

int emulated_upconv2x2_forward(const char* version, const float* x, const float* w, const float* b,
                               float* y, int N, int C, int H, int W, int O, char* error,
                               int error_size) {
  return guarded(version, error, error_size, [&](unet::Conv3x3Version v) {
    unet::launch_upconv2x2_forward(x, w, b, y, N, C, H, W, O, v, nullptr);
  });
}

int emulated_upconv2x2_backward_data(const char* version, const float* dy, const float* w,
                                     const float* relu_mask, float* dx, int N, int C, int H,
                                     int W, int O, char* error, int error_size) {
  return guarded(version, error, error_size, [&](unet::Conv3x3Version v) {
    unet::launch_upconv2x2_backward_data(dy, w, relu_mask, dx, N, C, H, W, O, v, nullptr);
  });
}

int emulated_upconv2x2_backward_weight(const char* version, const float* x, const float* dy,
                                       float* dw, float* db, int N, int C, int H, int W, int O,
                                       char* error, int error_size) {
  return guarded(version, error, error_size, [&](unet::Conv3x3Version v) {
    unet::launch_upconv2x2_backward_weight(x, dy, dw, db, N, C, H, W, O, v, nullptr);
  });
}

int emulated_conv1x1_forward(const float* x, const float* w, const float* b, float* y, int N, int C,
                             int H, int W, int O, char* error, int error_size) {
  return guarded_plain(error, error_size,
                       [&] { unet::launch_conv1x1_forward(x, w, b, y, N, C, H, W, O, nullptr); });
}

int emulated_conv1x1_backward_data(const float* dy, const float* w, const float* relu_mask,
                                   float* dx, int N, int C, int H, int W, int O, char* error,
                                   int error_size) {
  return guarded_plain(error, error_size, [&] {
    unet::launch_conv1x1_backward_data(dy, w, relu_mask, dx, N, C, H, W, O, nullptr);
  });
}

int emulated_conv1x1_backward_weight(const float* x, const float* dy, float* dw, float* db, int N,
                                     int C, int H, int W, int O, char* error, int error_size) {
  return guarded_plain(error, error_size, [&] {
    unet::launch_conv1x1_backward_weight(x, dy, dw, db, N, C, H, W, O, nullptr);
  });
}

int emulated_bias_backward(const float* dy, float* db, int N, int O, int64_t HW, char* error,
                           int error_size) {
  return guarded_plain(error, error_size, [&] { unet::launch_bias_backward(dy, db, N, O, HW, nullptr); });
}

// seed_on_device: null, or the seed in (host) memory, as the kernels read it from device memory.
int emulated_dropout_mask(uint8_t* mask, int64_t n, double p, uint64_t seed,
                          const uint64_t* seed_on_device, char* error, int error_size) {
  return guarded_plain(error, error_size, [&] {
    unet::launch_dropout_mask(mask, n, p, seed, seed_on_device, nullptr);
  });
}

int emulated_dropout_forward(const float* x, const uint8_t* mask, float* y, int64_t n, double p,
                             char* error, int error_size) {
  return guarded_plain(error, error_size,
                       [&] { unet::launch_dropout_forward(x, mask, y, n, p, nullptr); });
}

int emulated_dropout_seeded(const float* x, float* y, int64_t n, double p, uint64_t seed,
                            const uint64_t* seed_on_device, char* error, int error_size) {
  return guarded_plain(error, error_size, [&] {
    unet::launch_dropout_seeded(x, y, n, p, seed, seed_on_device, nullptr);
  });
}

int emulated_relu_backward(const float* y, const float* dy, float* dx, int64_t n, char* error,
                           int error_size) {
  return guarded_plain(error, error_size, [&] { unet::launch_relu_backward(y, dy, dx, n, nullptr); });
}

int emulated_accumulate(float* dst, const float* src, int64_t n, char* error, int error_size) {
  return guarded_plain(error, error_size, [&] { unet::launch_accumulate(dst, src, n, nullptr); });
}

// lr_on_device: null, or the rate in (host) memory, as the kernels read it from device memory.
int emulated_sgd_momentum_update(float* param, const float* grad, float* velocity, int64_t n, float lr,
                                 const float* lr_on_device, float momentum, float weight_decay,
                                 char* error, int error_size) {
  return guarded_plain(error, error_size, [&] {
    unet::launch_sgd_momentum_update(param, grad, velocity, n, lr, lr_on_device, momentum, weight_decay,
                                     nullptr);
  });
}

int emulated_sgd_momentum_update_multi(float* const* params, const float* const* grads,
                                       float* const* velocities, const int64_t* sizes, int count,
                                       float lr, const float* lr_on_device, float momentum,
                                       float weight_decay, char* error, int error_size) {
  return guarded_plain(error, error_size, [&] {
    unet::launch_sgd_momentum_update_multi(params, grads, velocities, sizes, count, lr, lr_on_device,
                                           momentum, weight_decay, nullptr);
  });
}

int emulated_maxpool2x2_forward(const float* x, float* y, uint8_t* argmax, int N, int C, int H, int W,
                                char* error, int error_size) {
  return guarded_plain(error, error_size,
                       [&] { unet::launch_maxpool2x2_forward(x, y, argmax, N, C, H, W, nullptr); });
}

int emulated_maxpool2x2_backward(const float* dy, const uint8_t* argmax, const float* relu_mask,
                                 float* dx, int accumulate, int N, int C, int H, int W,
                                 char* error, int error_size) {
  return guarded_plain(error, error_size, [&] {
    unet::launch_maxpool2x2_backward(dy, argmax, relu_mask, dx, accumulate != 0, N, C, H, W,
                                     nullptr);
  });
}

}  // extern "C"
