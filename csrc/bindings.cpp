// bindings.cpp: the Python module unet_cuda._C, one function per launcher of launchers.h.
//
// Every function takes its arrays as Python objects exposing __cuda_array_interface__ (CuPy arrays,
// or anything else that follows the protocol), its outputs already allocated by the caller
// (unet_cuda/ops/cuda.py), its scalars, and the keyword-only `stream`: the cudaStream_t as an
// integer (CuPy's cupy.cuda.get_current_stream().ptr; 0 is the legacy default stream).
//
// Before anything touches the device, every argument is checked, in this order, by the one helper
// set below (OpArgs): it is a CUDA array; dtype ('<f4' float32, '<i4' int32 labels, '|u1' uint8
// masks and argmax, '<u8' uint64 dropout seeds); number of dimensions; C-contiguity; no null
// pointer for a non-empty array; no read-only output; the shapes of the op (consistency between
// arguments, sizes the op needs); scalars; no output overlapping another argument. Only then does
// it ask the CUDA runtime whether every pointer is memory of the current device. A failed check
// raises ValueError (TypeError for an object that is no array at all) naming the op, the argument
// and the shapes of the arguments.
// conv3x3's keyword `version` (its kernel, by name) is checked first of all.
//
// Two scalars may also be 0-d CUDA arrays, read by the kernel when it runs rather than when it is
// launched: the dropout ops' `seed` (uint64) and the SGD ops' `lr` (float32). A CUDA graph
// captures a launch with its arguments; with the value in device memory, each replay uses what
// the host wrote there since (unet_cuda/graph.py). Such an array gets the array checks above; its
// value cannot be checked without a synchronisation and is not.
#include <pybind11/pybind11.h>

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <iterator>
#include <string>
#include <utility>
#include <vector>

#include "launchers.h"

namespace py = pybind11;

namespace unet {
namespace {

enum class DType { kFloat32, kInt32, kUInt8, kUInt64 };

const char* dtype_typestr(DType t) {
  switch (t) {
    case DType::kFloat32: return "<f4";
    case DType::kInt32: return "<i4";
    case DType::kUInt8: return "|u1";
    case DType::kUInt64: return "<u8";
  }
  return "?";
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kInt32: return "int32";
    case DType::kUInt8: return "uint8";
    case DType::kUInt64: return "uint64";
  }
  return "?";
}

int64_t dtype_itemsize(DType t) {
  switch (t) {
    case DType::kUInt8: return 1;
    case DType::kUInt64: return 8;
    default: return 4;
  }
}

bool typestr_matches(const std::string& got, DType want) {
  const std::string expected = dtype_typestr(want);
  // A one-byte type has no byte order: '|u1', '<u1' and '=u1' are all uint8.
  if (dtype_itemsize(want) == 1) return got.size() == 3 && got.substr(1) == expected.substr(1);
  return got == expected;
}

constexpr int kAnyNdim = -1;

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(shape[i]);
  }
  if (shape.size() == 1) s += ",";
  return s + ")";
}

std::string repr_str(py::handle obj) { return py::repr(obj).cast<std::string>(); }

// "numpy.ndarray", "list": the type of obj as Python code would name it.
std::string type_name(py::handle obj) {
  const py::handle type = py::type::handle_of(obj);
  const std::string module = py::str(type.attr("__module__")).cast<std::string>();
  const std::string name = py::str(type.attr("__qualname__")).cast<std::string>();
  return module == "builtins" ? name : module + "." + name;
}

// One argument, read from its __cuda_array_interface__.
struct DeviceArray {
  std::string name;
  std::uintptr_t ptr = 0;
  std::vector<int64_t> shape;
  int64_t size = 1;  // number of elements
  int64_t itemsize = 0;
  bool output = false;
  bool given = true;  // false: an optional argument passed as None (no data)

  int dim(size_t i) const { return static_cast<int>(shape[i]); }
  int64_t bytes() const { return size * itemsize; }
  template <typename T>
  T* data() const {
    return reinterpret_cast<T*>(ptr);
  }
};

// Checks the arguments of one call of one op and builds the error messages.
class OpArgs {
 public:
  explicit OpArgs(std::string op) : op_(std::move(op)) {}

  DeviceArray input(py::handle obj, const char* name, DType dtype, int ndim) {
    return add(obj, name, dtype, ndim, /*output=*/false);
  }
  DeviceArray output(py::handle obj, const char* name, DType dtype, int ndim) {
    return add(obj, name, dtype, ndim, /*output=*/true);
  }
  // An input that may be None: then an array that is not `given`, of no elements.
  DeviceArray optional_input(py::handle obj, const char* name, DType dtype, int ndim) {
    if (!obj.is_none()) return input(obj, name, dtype, ndim);
    DeviceArray a;
    a.name = name;
    a.size = 0;
    a.given = false;
    return a;
  }
  // An optional relu_mask: None, or a float32 array of `like`'s shape. Its pointer, or null.
  const float* relu_mask(py::handle obj, const char* name, const DeviceArray& like) {
    const DeviceArray mask =
        optional_input(obj, name, DType::kFloat32, static_cast<int>(like.shape.size()));
    if (!mask.given) return nullptr;
    require_shape(mask, like.shape, "the shape of " + like.name);
    return mask.data<const float>();
  }

  // ValueError "<op>: argument <arg> <what> [shapes of the arguments read so far]".
  [[noreturn]] void fail(const std::string& arg, const std::string& what) const {
    throw py::value_error(op_ + ": argument " + arg + " " + what + shapes_note());
  }
  void require(bool ok, const std::string& arg, const std::string& what) const {
    if (!ok) fail(arg, what);
  }
  void require_shape(const DeviceArray& a, const std::vector<int64_t>& expected,
                     const std::string& rule) const {
    if (a.shape != expected)
      fail(a.name, "must have shape " + shape_str(expected) + " = " + rule + ", got " +
                       shape_str(a.shape));
  }
  void require_same_shape(const DeviceArray& a, const DeviceArray& like) const {
    require_shape(a, like.shape, "the shape of " + like.name);
  }
  // A float scalar: `ok` is the caller's test (written so that NaN fails it), `rule` says it.
  void require_scalar(bool ok, const char* name, double v, const char* rule) const {
    if (!ok) fail(name, std::string("must be ") + rule + ", got " + repr_str(py::float_(v)));
  }

  // The last checks, after all the arithmetic ones: no output shares memory with another
  // argument, and every non-empty array is memory of the current device (asked of the runtime).
  void check_memory() const {
    for (size_t i = 0; i < arrays_.size(); ++i) {
      for (size_t j = i + 1; j < arrays_.size(); ++j) {
        const DeviceArray& a = arrays_[i];
        const DeviceArray& b = arrays_[j];
        if (!(a.output || b.output) || a.size == 0 || b.size == 0) continue;
        const bool overlap = a.ptr < b.ptr + b.bytes() && b.ptr < a.ptr + a.bytes();
        if (overlap) fail(b.output ? b.name : a.name,
                          "overlaps argument " + (b.output ? a.name : b.name) + " in memory");
      }
    }
    int current = -1;
    bool have_device = false;
    for (const DeviceArray& a : arrays_) {
      if (a.size == 0) continue;
      cudaPointerAttributes attr{};
      const cudaError_t err = cudaPointerGetAttributes(&attr, reinterpret_cast<void*>(a.ptr));
      if (err != cudaSuccess) {
        cudaGetLastError();  // clear it, so that it does not surface at the next launch check
        throw std::runtime_error(op_ + ": cannot check that argument " + a.name +
                                 " is device memory: cudaPointerGetAttributes failed: " +
                                 cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
      }
      if (attr.type == cudaMemoryTypeManaged) continue;
      if (attr.type != cudaMemoryTypeDevice)
        fail(a.name, "is host memory, not CUDA device memory (pass a CuPy array)");
      if (!have_device) {
        const cudaError_t derr = cudaGetDevice(&current);
        if (derr != cudaSuccess) {
          cudaGetLastError();
          throw std::runtime_error(op_ + ": cudaGetDevice failed: " + cudaGetErrorString(derr));
        }
        have_device = true;
      }
      if (attr.device != current)
        fail(a.name, "is memory of device " + std::to_string(attr.device) +
                         " but the current device is " + std::to_string(current));
    }
  }

 private:
  std::string where(const char* name) const { return op_ + ": argument " + name; }

  std::string shapes_note() const {
    if (arrays_.empty()) return "";
    std::string s = " [";
    for (size_t i = 0; i < arrays_.size(); ++i) {
      if (i > 0) s += ", ";
      s += arrays_[i].name + ": " + shape_str(arrays_[i].shape);
    }
    return s + "]";
  }

  int64_t to_int(py::handle v, const char* name, const char* field) const {
    if (!py::isinstance<py::int_>(v) || py::isinstance<py::bool_>(v))
      throw py::value_error(where(name) + ": __cuda_array_interface__['" + field +
                            "'] holds " + repr_str(v) + ", not an integer");
    return v.cast<int64_t>();
  }

  // Reads the interface and checks what does not depend on the op: dtype, ndim, contiguity,
  // null pointers, writability of outputs.
  DeviceArray add(py::handle obj, const char* name, DType dtype, int ndim, bool output) {
    if (!py::hasattr(obj, "__cuda_array_interface__")) {
      const std::string type = type_name(obj);
      if (py::hasattr(obj, "__array_interface__") || py::hasattr(obj, "__array__"))
        throw py::value_error(where(name) + " is host memory (" + type +
                              "), not a CUDA array: pass a CuPy array");
      throw py::type_error(where(name) + " must be a CUDA array (an object with "
                           "__cuda_array_interface__, such as a CuPy array), got " + type);
    }
    const py::object iface_obj = obj.attr("__cuda_array_interface__");
    if (!py::isinstance<py::dict>(iface_obj))
      throw py::value_error(where(name) + ": __cuda_array_interface__ is not a dict");
    const py::dict iface = py::reinterpret_borrow<py::dict>(iface_obj);
    for (const char* key : {"shape", "typestr", "data"})
      if (!iface.contains(key))
        throw py::value_error(where(name) + ": __cuda_array_interface__ has no '" + key + "'");

    DeviceArray a;
    a.name = name;
    a.output = output;
    a.itemsize = dtype_itemsize(dtype);

    const py::object shape = iface["shape"];
    if (!py::isinstance<py::tuple>(shape) && !py::isinstance<py::list>(shape))
      throw py::value_error(where(name) + ": __cuda_array_interface__['shape'] is not a tuple");
    for (py::handle extent : shape) {
      const int64_t v = to_int(extent, name, "shape");
      if (v < 0 || v > INT32_MAX)
        throw py::value_error(where(name) + " has an extent " + std::to_string(v) +
                              " outside [0, 2^31)");
      a.shape.push_back(v);
      a.size *= v;
    }

    const py::object typestr = iface["typestr"];
    const std::string ts =
        py::isinstance<py::str>(typestr) ? typestr.cast<std::string>() : repr_str(typestr);
    if (!typestr_matches(ts, dtype))
      throw py::value_error(where(name) + " must have dtype " + dtype_name(dtype) + " ('" +
                            dtype_typestr(dtype) + "'), got '" + ts + "' with shape " +
                            shape_str(a.shape));

    if (ndim != kAnyNdim && static_cast<int>(a.shape.size()) != ndim)
      throw py::value_error(where(name) + " must have " + std::to_string(ndim) +
                            " dimensions, got shape " + shape_str(a.shape));

    const py::object data = iface["data"];
    if (!py::isinstance<py::tuple>(data) || py::len(data) != 2)
      throw py::value_error(where(name) + ": __cuda_array_interface__['data'] is not a "
                            "(pointer, read_only) pair");
    const py::tuple data_pair = py::reinterpret_borrow<py::tuple>(data);
    const int64_t ptr = to_int(data_pair[0], name, "data");
    a.ptr = static_cast<std::uintptr_t>(ptr);
    const bool read_only = py::bool_(data_pair[1]);

    if (iface.contains("mask") && !iface["mask"].is_none())
      throw py::value_error(where(name) + " is a masked array, which is not supported");

    if (iface.contains("strides") && !iface["strides"].is_none() && a.size > 0) {
      const py::object strides = iface["strides"];
      if ((!py::isinstance<py::tuple>(strides) && !py::isinstance<py::list>(strides)) ||
          py::len(strides) != a.shape.size())
        throw py::value_error(where(name) + ": __cuda_array_interface__['strides'] is not a "
                              "tuple of one stride per dimension");
      int64_t expected = a.itemsize;  // C-contiguous stride in bytes, innermost dimension first
      for (size_t k = a.shape.size(); k-- > 0;) {
        const int64_t stride = to_int(py::reinterpret_borrow<py::sequence>(strides)[k], name,
                                      "strides");
        if (a.shape[k] != 1 && stride != expected)
          throw py::value_error(where(name) + " must be C-contiguous, got strides " +
                                repr_str(strides) + " (bytes) for shape " + shape_str(a.shape) +
                                " (copy it with cupy.ascontiguousarray)");
        expected *= a.shape[k];
      }
    }

    if (a.size > 0 && a.ptr == 0)
      throw py::value_error(where(name) + " has a null data pointer but shape " +
                            shape_str(a.shape));
    if (output && read_only)
      throw py::value_error(where(name) + " is an output but its memory is read-only");

    arrays_.push_back(a);
    return a;
  }

  std::string op_;
  std::vector<DeviceArray> arrays_;
};

cudaStream_t as_stream(std::uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

// ---------------------------------------------------------------------------------------------
// Convolutions. Each family is described by its weight size and the output size it makes of an
// input size; the same check serves forward, backward-data and backward-weight of all three.

struct ConvFamily {
  const char* name;                 // "conv3x3"
  int k;                            // w is [O, C, k, k]
  int64_t min_in;                   // smallest legal input size
  int64_t (*out_size)(int64_t in);  // output size from input size
  const char* out_rule;             // how the output shape follows, for messages
};

const ConvFamily kConv3x3{"conv3x3", 3, 3, [](int64_t in) { return in - 2; }, "(N, O, H-2, W-2)"};
const ConvFamily kConv1x1{"conv1x1", 1, 1, [](int64_t in) { return in; }, "(N, O, H, W)"};
const ConvFamily kUpconv2x2{"upconv2x2", 2, 1, [](int64_t in) { return 2 * in; },
                            "(N, O, 2H, 2W)"};

struct ConvDims {
  int N, C, H, W, O;
};

// in: the input-side array [N, C, H, W] (x, or dx), w: [O, C, k, k] (w, or dw),
// out: the output-side array (y, or dy).
ConvDims check_conv(const OpArgs& args, const ConvFamily& f, const DeviceArray& in,
                    const DeviceArray& w, const DeviceArray& out) {
  const ConvDims d{in.dim(0), in.dim(1), in.dim(2), in.dim(3), w.dim(0)};
  args.require(d.H >= f.min_in && d.W >= f.min_in, in.name,
               "needs H and W >= " + std::to_string(f.min_in) + ", got shape " +
                   shape_str(in.shape));
  const int64_t k = f.k;
  args.require_shape(w, {d.O, d.C, k, k},
                     "(O, C, " + std::to_string(k) + ", " + std::to_string(k) + ") with C from " +
                         in.name);
  args.require_shape(out, {d.N, d.O, f.out_size(d.H), f.out_size(d.W)},
                     std::string(f.out_rule) + " from " + in.name + " and " + w.name);
  return d;
}

// conv3x3's kernel version, by name (launchers.h: kConv3x3Versions). An unknown name is a
// ValueError that lists the valid ones; it is checked before the arrays.
Conv3x3Version conv3x3_version_arg(const char* op, const std::string& name) {
  std::string valid;
  for (const Conv3x3VersionName& v : kConv3x3Versions) {
    if (name == v.name) return v.version;
    valid += std::string(valid.empty() ? "" : ", ") + "'" + v.name + "'";
  }
  throw py::value_error(std::string(op) + ": argument version must be one of " + valid +
                        ", got " + repr_str(py::str(name)));
}

// Launch: anything callable with the launcher's arguments less the version (a launcher, or a
// lambda that adds conv3x3's version), e.g. (x, w, b, y, N, C, H, W, O, relu, stream).
template <typename Launch>
void conv_forward(const ConvFamily& f, Launch launch, bool relu, py::handle x_obj,
                  py::handle w_obj, py::handle b_obj, py::handle y_obj, std::uintptr_t stream) {
  OpArgs args(std::string(f.name) + "_forward");
  const DeviceArray x = args.input(x_obj, "x", DType::kFloat32, 4);
  const DeviceArray w = args.input(w_obj, "w", DType::kFloat32, 4);
  const DeviceArray b = args.input(b_obj, "b", DType::kFloat32, 1);
  const DeviceArray y = args.output(y_obj, "y", DType::kFloat32, 4);
  const ConvDims d = check_conv(args, f, x, w, y);
  args.require_shape(b, {d.O}, "(O,) from w");
  args.check_memory();
  py::gil_scoped_release no_gil;
  launch(x.data<const float>(), w.data<const float>(), b.data<const float>(), y.data<float>(), d.N,
         d.C, d.H, d.W, d.O, relu, as_stream(stream));
}

// conv1x1 has no fused ReLU: this gives its forward launcher conv3x3's signature.
void conv1x1_forward_launch(const float* x, const float* w, const float* b, float* y, int N, int C,
                            int H, int W, int O, bool /*relu*/, cudaStream_t stream) {
  launch_conv1x1_forward(x, w, b, y, N, C, H, W, O, stream);
}

// relu_mask: None, or an array of dx's shape (launchers.h).
template <typename Launch>
void conv_backward_data(const ConvFamily& f, Launch launch, py::handle dy_obj,
                        py::handle w_obj, py::handle dx_obj, py::handle mask_obj,
                        std::uintptr_t stream) {
  OpArgs args(std::string(f.name) + "_backward_data");
  const DeviceArray dy = args.input(dy_obj, "dy", DType::kFloat32, 4);
  const DeviceArray w = args.input(w_obj, "w", DType::kFloat32, 4);
  const DeviceArray dx = args.output(dx_obj, "dx", DType::kFloat32, 4);
  const ConvDims d = check_conv(args, f, dx, w, dy);
  const float* relu_mask = args.relu_mask(mask_obj, "relu_mask", dx);
  args.check_memory();
  py::gil_scoped_release no_gil;
  launch(dy.data<const float>(), w.data<const float>(), relu_mask, dx.data<float>(), d.N, d.C,
         d.H, d.W, d.O, as_stream(stream));
}

template <typename Launch>
void conv_backward_weight(const ConvFamily& f, Launch launch, py::handle x_obj,
                          py::handle dy_obj, py::handle dw_obj, py::handle db_obj,
                          std::uintptr_t stream) {
  OpArgs args(std::string(f.name) + "_backward_weight");
  const DeviceArray x = args.input(x_obj, "x", DType::kFloat32, 4);
  const DeviceArray dy = args.input(dy_obj, "dy", DType::kFloat32, 4);
  const DeviceArray dw = args.output(dw_obj, "dw", DType::kFloat32, 4);
  const DeviceArray db = args.output(db_obj, "db", DType::kFloat32, 1);
  const ConvDims d = check_conv(args, f, x, dw, dy);
  args.require_shape(db, {d.O}, "(O,) from dw");
  args.check_memory();
  py::gil_scoped_release no_gil;
  launch(x.data<const float>(), dy.data<const float>(), dw.data<float>(), db.data<float>(), d.N,
         d.C, d.H, d.W, d.O, as_stream(stream));
}

// ---------------------------------------------------------------------------------------------
// The other ops.

void maxpool2x2_forward(py::handle x_obj, py::handle y_obj, py::handle argmax_obj,
                        std::uintptr_t stream) {
  OpArgs args("maxpool2x2_forward");
  const DeviceArray x = args.input(x_obj, "x", DType::kFloat32, 4);
  const DeviceArray y = args.output(y_obj, "y", DType::kFloat32, 4);
  const DeviceArray argmax = args.output(argmax_obj, "argmax", DType::kUInt8, 4);
  const int N = x.dim(0), C = x.dim(1), H = x.dim(2), W = x.dim(3);
  args.require(H % 2 == 0 && W % 2 == 0 && H > 0 && W > 0, "x",
               "needs even, positive H and W for a 2x2 stride-2 pool, got shape " +
                   shape_str(x.shape));
  args.require_shape(y, {N, C, H / 2, W / 2}, "(N, C, H/2, W/2) from x");
  args.require_same_shape(argmax, y);
  args.check_memory();
  py::gil_scoped_release no_gil;
  launch_maxpool2x2_forward(x.data<const float>(), y.data<float>(), argmax.data<uint8_t>(), N, C,
                            H, W, as_stream(stream));
}

// relu_mask: None, or the pool's output y (dy's shape), launchers.h.
void maxpool2x2_backward(py::handle dy_obj, py::handle argmax_obj, py::handle dx_obj,
                         std::uintptr_t stream, py::handle mask_obj, bool accumulate) {
  OpArgs args("maxpool2x2_backward");
  const DeviceArray dy = args.input(dy_obj, "dy", DType::kFloat32, 4);
  const DeviceArray argmax = args.input(argmax_obj, "argmax", DType::kUInt8, 4);
  const DeviceArray dx = args.output(dx_obj, "dx", DType::kFloat32, 4);
  args.require_same_shape(argmax, dy);
  const int N = dy.dim(0), C = dy.dim(1), H = 2 * dy.dim(2), W = 2 * dy.dim(3);
  args.require_shape(dx, {N, C, H, W}, "(N, C, 2h, 2w) from dy");
  const float* relu_mask = args.relu_mask(mask_obj, "relu_mask", dy);
  args.check_memory();
  py::gil_scoped_release no_gil;
  launch_maxpool2x2_backward(dy.data<const float>(), argmax.data<const uint8_t>(), relu_mask,
                             dx.data<float>(), accumulate, N, C, H, W, as_stream(stream));
}

// The crop of skip [N, Cs, Hs, Ws] to H x W: both differences even and >= 0.
void check_crop(const OpArgs& args, const DeviceArray& skip, int H, int W) {
  const int dh = skip.dim(2) - H, dw = skip.dim(3) - W;
  args.require(dh >= 0 && dw >= 0 && dh % 2 == 0 && dw % 2 == 0, skip.name,
               "cannot be centre-cropped to " + std::to_string(H) + " x " + std::to_string(W) +
                   ": Hs-H = " + std::to_string(dh) + " and Ws-W = " + std::to_string(dw) +
                   " must be even and >= 0");
}

void crop_concat_forward(py::handle up_obj, py::handle skip_obj, py::handle y_obj,
                         std::uintptr_t stream) {
  OpArgs args("crop_concat_forward");
  const DeviceArray up = args.input(up_obj, "up", DType::kFloat32, 4);
  const DeviceArray skip = args.input(skip_obj, "skip", DType::kFloat32, 4);
  const DeviceArray y = args.output(y_obj, "y", DType::kFloat32, 4);
  const int N = up.dim(0), Cu = up.dim(1), H = up.dim(2), W = up.dim(3);
  const int Cs = skip.dim(1), Hs = skip.dim(2), Ws = skip.dim(3);
  args.require(skip.dim(0) == N, "skip", "must have the batch size N = " + std::to_string(N) +
                                             " of up, got shape " + shape_str(skip.shape));
  check_crop(args, skip, H, W);
  args.require_shape(y, {N, Cu + Cs, H, W}, "(N, Cu+Cs, H, W) from up and skip");
  args.check_memory();
  py::gil_scoped_release no_gil;
  launch_crop_concat_forward(up.data<const float>(), skip.data<const float>(), y.data<float>(), N,
                             Cu, H, W, Cs, Hs, Ws, as_stream(stream));
}

void crop_concat_backward(py::handle dy_obj, py::handle dup_obj, py::handle dskip_obj,
                          std::uintptr_t stream) {
  OpArgs args("crop_concat_backward");
  const DeviceArray dy = args.input(dy_obj, "dy", DType::kFloat32, 4);
  const DeviceArray dup = args.output(dup_obj, "dup", DType::kFloat32, 4);
  const DeviceArray dskip = args.output(dskip_obj, "dskip", DType::kFloat32, 4);
  const int N = dy.dim(0), H = dy.dim(2), W = dy.dim(3);
  const int Cs = dskip.dim(1), Hs = dskip.dim(2), Ws = dskip.dim(3);
  args.require(dskip.dim(0) == N && Cs <= dy.dim(1), "dskip",
               "must have shape (N, Cs, Hs, Ws) with N = " + std::to_string(N) +
                   " and Cs <= " + std::to_string(dy.dim(1)) + " from dy, got " +
                   shape_str(dskip.shape));
  const int Cu = dy.dim(1) - Cs;
  check_crop(args, dskip, H, W);
  args.require_shape(dup, {N, Cu, H, W}, "(N, Cu, H, W) with Cu = dy's channels - dskip's");
  args.check_memory();
  py::gil_scoped_release no_gil;
  launch_crop_concat_backward(dy.data<const float>(), dup.data<float>(), dskip.data<float>(), N, Cu,
                              H, W, Cs, Hs, Ws, as_stream(stream));
}

// The convolution of the concatenation [up, centre crop of skip] (never stored): the GEMM
// versions only (conv3x3_fuses_concat); the version is checked first, as for conv3x3.
Conv3x3Version conv3x3_concat_version_arg(const char* op, const std::string& name) {
  const Conv3x3Version v = conv3x3_version_arg(op, name);
  if (!conv3x3_fuses_concat(v))
    throw py::value_error(std::string(op) + ": argument version " + repr_str(py::str(name)) +
                          " cannot read a concatenated input; use a GEMM version ('v3_igemm', "
                          "'v4_tf32_mma', 'v5_bf16_mma' or 'v6_tf32_wgmma'), or crop_concat_forward "
                          "and conv3x3_forward");
  return v;
}

struct ConcatDims {
  int N, Cu, Cs, H, W, Hs, Ws, O;
};

// up [N, Cu, H, W] (or dup), skip [N, Cs, Hs, Ws] (or dskip), w [O, Cu+Cs, 3, 3] (or dw),
// out [N, O, H-2, W-2] (y or dy).
ConcatDims check_concat_conv(const OpArgs& args, const DeviceArray& up, const DeviceArray& skip,
                             const DeviceArray& w, const DeviceArray& out) {
  const ConcatDims d{up.dim(0), up.dim(1), skip.dim(1), up.dim(2),
                     up.dim(3), skip.dim(2), skip.dim(3), w.dim(0)};
  args.require(d.H >= 3 && d.W >= 3, up.name, "needs H and W >= 3, got shape " + shape_str(up.shape));
  args.require(skip.dim(0) == d.N, skip.name, "must have the batch size N = " +
                                                  std::to_string(d.N) + " of " + up.name +
                                                  ", got shape " + shape_str(skip.shape));
  check_crop(args, skip, d.H, d.W);
  args.require_shape(w, {d.O, int64_t{d.Cu} + d.Cs, 3, 3},
                     std::string("(O, Cu+Cs, 3, 3) with Cu from ") + up.name + " and Cs from " +
                         skip.name);
  args.require_shape(out, {d.N, d.O, d.H - 2, d.W - 2},
                     std::string("(N, O, H-2, W-2) from ") + up.name + " and " + w.name);
  return d;
}

void conv3x3_concat_forward(py::handle up_obj, py::handle skip_obj, py::handle w_obj,
                            py::handle b_obj, py::handle y_obj, bool relu, std::uintptr_t stream,
                            const std::string& version) {
  const Conv3x3Version v = conv3x3_concat_version_arg("conv3x3_concat_forward", version);
  OpArgs args("conv3x3_concat_forward");
  const DeviceArray up = args.input(up_obj, "up", DType::kFloat32, 4);
  const DeviceArray skip = args.input(skip_obj, "skip", DType::kFloat32, 4);
  const DeviceArray w = args.input(w_obj, "w", DType::kFloat32, 4);
  const DeviceArray b = args.input(b_obj, "b", DType::kFloat32, 1);
  const DeviceArray y = args.output(y_obj, "y", DType::kFloat32, 4);
  const ConcatDims d = check_concat_conv(args, up, skip, w, y);
  args.require_shape(b, {d.O}, "(O,) from w");
  args.check_memory();
  py::gil_scoped_release no_gil;
  launch_conv3x3_concat_forward(up.data<const float>(), skip.data<const float>(),
                                w.data<const float>(), b.data<const float>(), y.data<float>(), d.N,
                                d.Cu, d.Cs, d.H, d.W, d.Hs, d.Ws, d.O, relu, v, as_stream(stream));
}

// up_mask / skip_mask: None, or arrays of dup's / dskip's shape (launchers.h).
void conv3x3_concat_backward_data(py::handle dy_obj, py::handle w_obj, py::handle dup_obj,
                                  py::handle dskip_obj, std::uintptr_t stream,
                                  const std::string& version, py::handle up_mask_obj,
                                  py::handle skip_mask_obj) {
  const Conv3x3Version v = conv3x3_concat_version_arg("conv3x3_concat_backward_data", version);
  OpArgs args("conv3x3_concat_backward_data");
  const DeviceArray dy = args.input(dy_obj, "dy", DType::kFloat32, 4);
  const DeviceArray w = args.input(w_obj, "w", DType::kFloat32, 4);
  const DeviceArray dup = args.output(dup_obj, "dup", DType::kFloat32, 4);
  const DeviceArray dskip = args.output(dskip_obj, "dskip", DType::kFloat32, 4);
  const ConcatDims d = check_concat_conv(args, dup, dskip, w, dy);
  const float* up_mask = args.relu_mask(up_mask_obj, "up_relu_mask", dup);
  const float* skip_mask = args.relu_mask(skip_mask_obj, "skip_relu_mask", dskip);
  args.check_memory();
  py::gil_scoped_release no_gil;
  launch_conv3x3_concat_backward_data(dy.data<const float>(), w.data<const float>(), up_mask,
                                      skip_mask, dup.data<float>(), dskip.data<float>(), d.N, d.Cu,
                                      d.Cs, d.H, d.W, d.Hs, d.Ws, d.O, v, as_stream(stream));
}

void conv3x3_concat_backward_weight(py::handle up_obj, py::handle skip_obj, py::handle dy_obj,
                                    py::handle dw_obj, py::handle db_obj, std::uintptr_t stream,
                                    const std::string& version) {
  const Conv3x3Version v = conv3x3_concat_version_arg("conv3x3_concat_backward_weight", version);
  OpArgs args("conv3x3_concat_backward_weight");
  const DeviceArray up = args.input(up_obj, "up", DType::kFloat32, 4);
  const DeviceArray skip = args.input(skip_obj, "skip", DType::kFloat32, 4);
  const DeviceArray dy = args.input(dy_obj, "dy", DType::kFloat32, 4);
  const DeviceArray dw = args.output(dw_obj, "dw", DType::kFloat32, 4);
  const DeviceArray db = args.output(db_obj, "db", DType::kFloat32, 1);
  const ConcatDims d = check_concat_conv(args, up, skip, dw, dy);
  args.require_shape(db, {d.O}, "(O,) from dw");
  args.check_memory();
  py::gil_scoped_release no_gil;
  launch_conv3x3_concat_backward_weight(up.data<const float>(), skip.data<const float>(),
                                        dy.data<const float>(), dw.data<float>(), db.data<float>(),
                                        d.N, d.Cu, d.Cs, d.H, d.W, d.Hs, d.Ws, d.O, v,
                                        as_stream(stream));
}

void relu_backward(py::handle y_obj, py::handle dy_obj, py::handle dx_obj, std::uintptr_t stream) {
  OpArgs args("relu_backward");
  const DeviceArray y = args.input(y_obj, "y", DType::kFloat32, kAnyNdim);
  const DeviceArray dy = args.input(dy_obj, "dy", DType::kFloat32, kAnyNdim);
  const DeviceArray dx = args.output(dx_obj, "dx", DType::kFloat32, kAnyNdim);
  args.require_same_shape(dy, y);
  args.require_same_shape(dx, y);
  args.check_memory();
  py::gil_scoped_release no_gil;
  launch_relu_backward(y.data<const float>(), dy.data<const float>(), dx.data<float>(), y.size,
                       as_stream(stream));
}

void accumulate(py::handle dst_obj, py::handle src_obj, std::uintptr_t stream) {
  OpArgs args("accumulate_");
  const DeviceArray dst = args.output(dst_obj, "dst", DType::kFloat32, kAnyNdim);
  const DeviceArray src = args.input(src_obj, "src", DType::kFloat32, kAnyNdim);
  args.require_same_shape(src, dst);
  args.check_memory();
  py::gil_scoped_release no_gil;
  launch_accumulate(dst.data<float>(), src.data<const float>(), dst.size, as_stream(stream));
}

// logits [N, K, H, W] with labels and weights [N, H, W]; returns the dimensions.
ConvDims check_softmax(const OpArgs& args, const DeviceArray& logits, const DeviceArray& labels,
                       const DeviceArray& weights) {
  const int N = logits.dim(0), K = logits.dim(1), H = logits.dim(2), W = logits.dim(3);
  args.require(K >= 1 && static_cast<int64_t>(N) * H * W >= 1, logits.name,
               "needs at least one class and one pixel, got shape " + shape_str(logits.shape));
  args.require_shape(labels, {N, H, W}, "(N, H, W) from " + logits.name);
  args.require_shape(weights, {N, H, W}, "(N, H, W) from " + logits.name);
  return ConvDims{N, K, H, W, K};
}

void softmax_xent_forward(py::handle logits_obj, py::handle labels_obj, py::handle weights_obj,
                          py::handle loss_obj, py::handle probs_obj, std::uintptr_t stream) {
  OpArgs args("softmax_xent_forward");
  const DeviceArray logits = args.input(logits_obj, "logits", DType::kFloat32, 4);
  const DeviceArray labels = args.input(labels_obj, "labels", DType::kInt32, 3);
  const DeviceArray weights = args.input(weights_obj, "weights", DType::kFloat32, 3);
  const DeviceArray loss = args.output(loss_obj, "loss", DType::kFloat32, 0);
  const DeviceArray probs = args.output(probs_obj, "probs", DType::kFloat32, 4);
  const ConvDims d = check_softmax(args, logits, labels, weights);
  args.require_same_shape(probs, logits);
  args.check_memory();
  py::gil_scoped_release no_gil;
  launch_softmax_xent_forward(logits.data<const float>(), labels.data<const int32_t>(),
                              weights.data<const float>(), loss.data<float>(), probs.data<float>(),
                              d.N, d.C, d.H, d.W, as_stream(stream));
}

void softmax_xent_backward(py::handle probs_obj, py::handle labels_obj, py::handle weights_obj,
                           py::handle dlogits_obj, double dloss, std::uintptr_t stream) {
  OpArgs args("softmax_xent_backward");
  const DeviceArray probs = args.input(probs_obj, "probs", DType::kFloat32, 4);
  const DeviceArray labels = args.input(labels_obj, "labels", DType::kInt32, 3);
  const DeviceArray weights = args.input(weights_obj, "weights", DType::kFloat32, 3);
  const DeviceArray dlogits = args.output(dlogits_obj, "dlogits", DType::kFloat32, 4);
  const ConvDims d = check_softmax(args, probs, labels, weights);
  args.require_same_shape(dlogits, probs);
  args.require_scalar(std::isfinite(dloss), "dloss", dloss, "finite");
  args.check_memory();
  py::gil_scoped_release no_gil;
  launch_softmax_xent_backward(probs.data<const float>(), labels.data<const int32_t>(),
                               weights.data<const float>(), dlogits.data<float>(),
                               static_cast<float>(dloss), d.N, d.C, d.H, d.W, as_stream(stream));
}

void check_dropout_p(const OpArgs& args, double p) {
  args.require_scalar(p >= 0.0 && p < 1.0, "p", p, "in [0, 1)");
}

// A scalar argument given as a 0-d CUDA array instead of a number (see the top of this file):
// anything with a __cuda_array_interface__ takes the array path and its checks.
bool is_device_scalar(py::handle obj) { return py::hasattr(obj, "__cuda_array_interface__"); }

// The seed as a number: any Python integer (or integer-like, e.g. numpy.uint64) in [0, 2^64).
uint64_t check_seed(const OpArgs& args, py::handle seed) {
  const std::string rule = "must be an integer in [0, 2**64) or a 0-d uint64 CUDA array, got ";
  if (py::isinstance<py::bool_>(seed) || py::isinstance<py::float_>(seed))
    args.fail("seed", rule + repr_str(seed));
  PyObject* index = PyNumber_Index(seed.ptr());
  if (index == nullptr) {
    PyErr_Clear();
    args.fail("seed", rule + repr_str(seed));
  }
  const unsigned long long value = PyLong_AsUnsignedLongLong(index);
  Py_DECREF(index);
  if (PyErr_Occurred()) {
    PyErr_Clear();
    args.fail("seed", rule + repr_str(seed));
  }
  return static_cast<uint64_t>(value);
}

// A dropout seed: an integer (passed to the kernel by value) or a 0-d uint64 CUDA array (by
// address, seed_on_device).
struct DropoutSeed {
  uint64_t seed = 0;
  const uint64_t* seed_on_device = nullptr;
};

DropoutSeed dropout_seed(OpArgs& args, py::handle seed_obj) {
  DropoutSeed s;
  if (is_device_scalar(seed_obj))
    s.seed_on_device = args.input(seed_obj, "seed", DType::kUInt64, 0).data<const uint64_t>();
  else
    s.seed = check_seed(args, seed_obj);
  return s;
}

void dropout_mask(py::handle mask_obj, double p, py::handle seed_obj, std::uintptr_t stream) {
  OpArgs args("dropout_mask");
  const DeviceArray mask = args.output(mask_obj, "mask", DType::kUInt8, kAnyNdim);
  check_dropout_p(args, p);
  const DropoutSeed seed = dropout_seed(args, seed_obj);
  args.check_memory();  // for a device seed: on this device, and not inside the mask
  py::gil_scoped_release no_gil;
  launch_dropout_mask(mask.data<uint8_t>(), mask.size, p, seed.seed, seed.seed_on_device,
                      as_stream(stream));
}

// dropout_seeded_forward (x -> y) and dropout_seeded_backward (dy -> dx): the mask hashed from the
// seed where it is applied.
void dropout_seeded(const char* op, const char* in_name, const char* out_name, py::handle in_obj,
                    py::handle out_obj, double p, py::handle seed_obj, std::uintptr_t stream) {
  OpArgs args(op);
  const DeviceArray in = args.input(in_obj, in_name, DType::kFloat32, kAnyNdim);
  const DeviceArray out = args.output(out_obj, out_name, DType::kFloat32, kAnyNdim);
  args.require_same_shape(out, in);
  check_dropout_p(args, p);
  const DropoutSeed seed = dropout_seed(args, seed_obj);
  args.check_memory();
  py::gil_scoped_release no_gil;
  launch_dropout_seeded(in.data<const float>(), out.data<float>(), in.size, p, seed.seed,
                        seed.seed_on_device, as_stream(stream));
}

// dropout_forward (x -> y) and dropout_backward (dy -> dx) take the same arguments.
using DropoutLaunch = void (*)(const float*, const uint8_t*, float*, int64_t, double, cudaStream_t);

void dropout_apply(const char* op, DropoutLaunch launch, const char* in_name,
                   const char* out_name, py::handle in_obj, py::handle mask_obj,
                   py::handle out_obj, double p, std::uintptr_t stream) {
  OpArgs args(op);
  const DeviceArray in = args.input(in_obj, in_name, DType::kFloat32, kAnyNdim);
  const DeviceArray mask = args.input(mask_obj, "mask", DType::kUInt8, kAnyNdim);
  const DeviceArray out = args.output(out_obj, out_name, DType::kFloat32, kAnyNdim);
  args.require_same_shape(mask, in);
  args.require_same_shape(out, in);
  check_dropout_p(args, p);
  args.check_memory();
  py::gil_scoped_release no_gil;
  launch(in.data<const float>(), mask.data<const uint8_t>(), out.data<float>(), in.size, p,
         as_stream(stream));
}

// The rate of an SGD step: a number, finite and >= 0 (passed to the kernel by value, as float32),
// or a 0-d float32 CUDA array (by address; its value is not checked).
struct SgdRate {
  float lr = 0.0f;
  const float* lr_on_device = nullptr;
};

SgdRate sgd_rate(OpArgs& args, const char* op, py::handle lr_obj) {
  SgdRate rate;
  if (is_device_scalar(lr_obj)) {
    rate.lr_on_device = args.input(lr_obj, "lr", DType::kFloat32, 0).data<const float>();
  } else {
    // A number, as Python's float() of it would be, strings excepted (PyFloat_AsDouble).
    const double value = PyFloat_AsDouble(lr_obj.ptr());
    if (value == -1.0 && PyErr_Occurred()) {
      PyErr_Clear();
      throw py::type_error(std::string(op) + ": argument lr must be a number or a 0-d float32 "
                           "CUDA array, got " + type_name(lr_obj));
    }
    args.require_scalar(std::isfinite(value) && value >= 0.0, "lr", value, "finite and >= 0");
    rate.lr = static_cast<float>(value);
  }
  return rate;
}

void check_sgd_constants(const OpArgs& args, double momentum, double weight_decay) {
  args.require_scalar(momentum >= 0.0 && momentum <= 1.0, "momentum", momentum, "in [0, 1]");
  args.require_scalar(std::isfinite(weight_decay) && weight_decay >= 0.0, "weight_decay",
                      weight_decay, "finite and >= 0");
}

void sgd_momentum_update(py::handle param_obj, py::handle grad_obj, py::handle velocity_obj,
                         py::handle lr_obj, double momentum, double weight_decay,
                         std::uintptr_t stream) {
  OpArgs args("sgd_momentum_update_");
  const DeviceArray param = args.output(param_obj, "param", DType::kFloat32, kAnyNdim);
  const DeviceArray grad = args.input(grad_obj, "grad", DType::kFloat32, kAnyNdim);
  const DeviceArray velocity = args.output(velocity_obj, "velocity", DType::kFloat32, kAnyNdim);
  args.require_same_shape(grad, param);
  args.require_same_shape(velocity, param);
  const SgdRate rate = sgd_rate(args, "sgd_momentum_update_", lr_obj);
  check_sgd_constants(args, momentum, weight_decay);
  args.check_memory();  // for a device lr: on this device, and not inside param or velocity
  py::gil_scoped_release no_gil;
  launch_sgd_momentum_update(param.data<float>(), grad.data<const float>(),
                             velocity.data<float>(), param.size, rate.lr, rate.lr_on_device,
                             static_cast<float>(momentum), static_cast<float>(weight_decay),
                             as_stream(stream));
}

// The same update of many parameters: three sequences of as many arrays, params[i], grads[i] and
// velocities[i] of one shape; every array checked as sgd_momentum_update_ checks it, and no
// output overlapping any other argument of the call.
void sgd_momentum_update_multi(py::handle params_obj, py::handle grads_obj,
                               py::handle velocities_obj, py::handle lr_obj, double momentum,
                               double weight_decay, std::uintptr_t stream) {
  const char* op = "sgd_momentum_update_multi_";
  OpArgs args(op);
  auto as_list = [&](py::handle obj, const char* name) {
    if (!py::isinstance<py::sequence>(obj) || py::isinstance<py::str>(obj) ||
        py::hasattr(obj, "__cuda_array_interface__"))
      throw py::type_error(std::string(op) + ": argument " + name +
                           " must be a sequence of CUDA arrays, got " + type_name(obj));
    return py::reinterpret_borrow<py::sequence>(obj);
  };
  const py::sequence params = as_list(params_obj, "params");
  const py::sequence grads = as_list(grads_obj, "grads");
  const py::sequence velocities = as_list(velocities_obj, "velocities");
  const size_t count = py::len(params);
  args.require(py::len(grads) == count, "grads",
               "must hold as many arrays as params (" + std::to_string(count) + "), got " +
                   std::to_string(py::len(grads)));
  args.require(py::len(velocities) == count, "velocities",
               "must hold as many arrays as params (" + std::to_string(count) + "), got " +
                   std::to_string(py::len(velocities)));
  args.require(count <= INT32_MAX, "params", "must hold fewer than 2^31 arrays");
  std::vector<float*> param_ptrs(count), velocity_ptrs(count);
  std::vector<const float*> grad_ptrs(count);
  std::vector<int64_t> sizes(count);
  for (size_t i = 0; i < count; ++i) {
    const std::string at = "[" + std::to_string(i) + "]";
    const DeviceArray param =
        args.output(params[i], ("params" + at).c_str(), DType::kFloat32, kAnyNdim);
    const DeviceArray grad = args.input(grads[i], ("grads" + at).c_str(), DType::kFloat32, kAnyNdim);
    const DeviceArray velocity =
        args.output(velocities[i], ("velocities" + at).c_str(), DType::kFloat32, kAnyNdim);
    args.require_same_shape(grad, param);
    args.require_same_shape(velocity, param);
    param_ptrs[i] = param.data<float>();
    grad_ptrs[i] = grad.data<const float>();
    velocity_ptrs[i] = velocity.data<float>();
    sizes[i] = param.size;
  }
  const SgdRate rate = sgd_rate(args, op, lr_obj);
  check_sgd_constants(args, momentum, weight_decay);
  args.check_memory();
  py::gil_scoped_release no_gil;
  launch_sgd_momentum_update_multi(param_ptrs.data(), grad_ptrs.data(), velocity_ptrs.data(),
                                   sizes.data(), static_cast<int>(count), rate.lr,
                                   rate.lr_on_device, static_cast<float>(momentum),
                                   static_cast<float>(weight_decay), as_stream(stream));
}

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

int cuda_runtime_version() {
  int version = 0;
  if (cudaRuntimeGetVersion(&version) != cudaSuccess) cudaGetLastError();
  return version;
}

// ---------------------------------------------------------------------------------------------
// The augmentation warp (warp.cu).

// quarter_turns: a Python integer (or integer-like, e.g. numpy.int64), not a bool, in 0..3.
int check_quarter_turns(const OpArgs& args, py::handle turns) {
  const std::string rule = "must be an integer 0, 1, 2 or 3, got ";
  if (py::isinstance<py::bool_>(turns) || py::isinstance<py::float_>(turns))
    args.fail("quarter_turns", rule + repr_str(turns));
  PyObject* index = PyNumber_Index(turns.ptr());
  if (index == nullptr) {
    PyErr_Clear();
    args.fail("quarter_turns", rule + repr_str(turns));
  }
  const long long value = PyLong_AsLongLong(index);
  Py_DECREF(index);
  if (PyErr_Occurred()) {
    PyErr_Clear();
    args.fail("quarter_turns", rule + repr_str(turns));
  }
  if (value < 0 || value > 3) args.fail("quarter_turns", rule + std::to_string(value));
  return static_cast<int>(value);
}

void augment_warp(py::handle image_obj, py::handle labels_obj, py::handle weights_obj,
                  py::handle coarse_obj, py::handle image_out_obj, py::handle labels_out_obj,
                  py::handle weights_out_obj, py::handle quarter_turns_obj, bool flip_rows,
                  bool flip_columns, double gamma, double contrast, double brightness,
                  std::uintptr_t stream) {
  OpArgs args("augment_warp");
  const DeviceArray image = args.input(image_obj, "image", DType::kFloat32, 2);
  const DeviceArray labels = args.input(labels_obj, "labels", DType::kInt32, 2);
  const DeviceArray weights = args.input(weights_obj, "weights", DType::kFloat32, 2);
  const DeviceArray coarse = args.input(coarse_obj, "coarse", DType::kFloat32, 3);
  const DeviceArray image_out = args.output(image_out_obj, "image_out", DType::kFloat32, 2);
  const DeviceArray labels_out = args.output(labels_out_obj, "labels_out", DType::kInt32, 2);
  const DeviceArray weights_out = args.output(weights_out_obj, "weights_out", DType::kFloat32, 2);
  const int H = image.dim(0), W = image.dim(1);
  args.require(H >= 1 && W >= 1, "image", "needs H and W >= 1, got shape " + shape_str(image.shape));
  args.require_same_shape(labels, image);
  args.require_same_shape(weights, image);
  args.require(coarse.shape[0] == 2 && coarse.shape[1] >= 1 && coarse.shape[2] >= 1, "coarse",
               "must have shape (2, gy, gx) with gy, gx >= 1 (dy and dx at the grid nodes), got " +
                   shape_str(coarse.shape));
  args.require_same_shape(image_out, image);
  args.require_same_shape(labels_out, image);
  args.require_same_shape(weights_out, image);
  const int quarter_turns = check_quarter_turns(args, quarter_turns_obj);
  args.require(quarter_turns % 2 == 0 || H == W, "quarter_turns",
               "is " + std::to_string(quarter_turns) + ", an odd number of quarter turns, which "
               "needs a square window (the outputs keep the source's shape), got image shape " +
                   shape_str(image.shape));
  args.require_scalar(std::isfinite(gamma) && gamma > 0.0, "gamma", gamma, "finite and > 0");
  args.require_scalar(std::isfinite(contrast), "contrast", contrast, "finite");
  args.require_scalar(std::isfinite(brightness), "brightness", brightness, "finite");
  args.check_memory();
  py::gil_scoped_release no_gil;
  launch_augment_warp(image.data<const float>(), labels.data<const int32_t>(),
                      weights.data<const float>(), coarse.data<const float>(),
                      image_out.data<float>(), labels_out.data<int32_t>(),
                      weights_out.data<float>(), H, W, coarse.dim(1), coarse.dim(2), quarter_turns,
                      flip_rows, flip_columns, gamma, contrast, brightness, as_stream(stream));
}

}  // namespace
}  // namespace unet

PYBIND11_MODULE(_C, m) {
  using namespace unet;
  using py::arg;
  m.doc() =
      "CUDA launchers of unet_cuda (docs/OPS.md). Arrays are CUDA arrays "
      "(__cuda_array_interface__), outputs are passed in, `stream` is a cudaStream_t as an "
      "integer. Use unet_cuda.ops.cuda.";

  m.def("cuda_version", &cuda_runtime_version,
        "CUDA runtime version the module was built with, e.g. 13000.");
  m.def("device_count", &device_count,
        "Number of CUDA devices; 0 when there is none or no driver.");

  // Convolutions. conv3x3 takes the keyword `version`: one of CONV3X3_VERSIONS.
  {
    py::tuple names(std::size(kConv3x3Versions));
    for (size_t i = 0; i < std::size(kConv3x3Versions); ++i) names[i] = kConv3x3Versions[i].name;
    m.attr("CONV3X3_VERSIONS") = names;
    py::list concat;  // the versions that read a concatenated input directly
    for (const Conv3x3VersionName& v : kConv3x3Versions)
      if (conv3x3_fuses_concat(v.version)) concat.append(v.name);
    m.attr("CONV3X3_CONCAT_VERSIONS") = py::tuple(concat);
    m.attr("CONV3X3_DEFAULT_VERSION") = kConv3x3DefaultVersion;
  }
  m.def(
      "conv3x3_forward",
      [](py::handle x, py::handle w, py::handle b, py::handle y, bool relu, std::uintptr_t stream,
         const std::string& version) {
        const Conv3x3Version v = conv3x3_version_arg("conv3x3_forward", version);
        conv_forward(
            kConv3x3,
            [v](const float* x, const float* w, const float* b, float* y, int N, int C, int H,
                int W, int O, bool relu, cudaStream_t s) {
              launch_conv3x3_forward(x, w, b, y, N, C, H, W, O, relu, v, s);
            },
            relu, x, w, b, y, stream);
      },
      arg("x"), arg("w"), arg("b"), arg("y"), arg("relu"), py::kw_only(), arg("stream"),
      arg("version") = kConv3x3DefaultVersion,
      "y[N,O,H-2,W-2] = valid 3x3 conv of x[N,C,H,W] with w[O,C,3,3] plus b[O], ReLU if relu; "
      "`version` names the kernel (CONV3X3_VERSIONS).");
  m.def(
      "conv3x3_backward_data",
      [](py::handle dy, py::handle w, py::handle dx, std::uintptr_t stream,
         const std::string& version, py::handle relu_mask) {
        const Conv3x3Version v = conv3x3_version_arg("conv3x3_backward_data", version);
        conv_backward_data(
            kConv3x3,
            [v](const float* dy, const float* w, const float* mask, float* dx, int N, int C, int H,
                int W, int O, cudaStream_t s) {
              launch_conv3x3_backward_data(dy, w, mask, dx, N, C, H, W, O, v, s);
            },
            dy, w, dx, relu_mask, stream);
      },
      arg("dy"), arg("w"), arg("dx"), py::kw_only(), arg("stream"),
      arg("version") = kConv3x3DefaultVersion, arg("relu_mask") = py::none(),
      "dx[N,C,P+2,Q+2] from dy[N,O,P,Q] and w[O,C,3,3]; `version` names the kernel; with "
      "relu_mask (dx's shape), dx is 0 where relu_mask <= 0 (a ReLU's backward, fused).");
  m.def(
      "conv3x3_backward_weight",
      [](py::handle x, py::handle dy, py::handle dw, py::handle db, std::uintptr_t stream,
         const std::string& version) {
        const Conv3x3Version v = conv3x3_version_arg("conv3x3_backward_weight", version);
        conv_backward_weight(
            kConv3x3,
            [v](const float* x, const float* dy, float* dw, float* db, int N, int C, int H, int W,
                int O, cudaStream_t s) {
              launch_conv3x3_backward_weight(x, dy, dw, db, N, C, H, W, O, v, s);
            },
            x, dy, dw, db, stream);
      },
      arg("x"), arg("dy"), arg("dw"), arg("db"), py::kw_only(), arg("stream"),
      arg("version") = kConv3x3DefaultVersion,
      "dw[O,C,3,3] and db[O] from x[N,C,H,W] and dy[N,O,H-2,W-2] (deterministic); `version` "
      "names the kernel.");
  m.def(
      "conv3x3_backward_weight_splits",
      [](int N, int C, int H, int W, int O, const std::string& version) {
        const Conv3x3Version v = conv3x3_version_arg("conv3x3_backward_weight_splits", version);
        if (N < 0 || C < 0 || O < 0 || H < 3 || W < 3)
          throw py::value_error("conv3x3_backward_weight_splits: needs N, C, O >= 0 and H, W >= 3");
        return conv3x3_backward_weight_splits(v, N, C, H, W, O);
      },
      arg("N"), arg("C"), arg("H"), arg("W"), arg("O"), py::kw_only(),
      arg("version") = kConv3x3DefaultVersion,
      "Slices (split-K) the weight gradient of `version` sums separately for x[N,C,H,W] and "
      "O output channels, then adds in a fixed order, by rule (a function of the shapes only; a "
      "measured plan in the table of tuned plans overrides it).");
  for (const auto& [fn_name, splits] :
       {std::pair{"conv3x3_forward_splits", &conv3x3_forward_splits},
        std::pair{"conv3x3_backward_data_splits", &conv3x3_backward_data_splits}}) {
    const std::string op = fn_name;
    m.def(
        fn_name,
        [op, splits](int N, int C, int H, int W, int O, const std::string& version) {
          const Conv3x3Version v = conv3x3_version_arg(op.c_str(), version);
          if (N < 0 || C < 0 || O < 0 || H < 3 || W < 3)
            throw py::value_error(op + ": needs N, C, O >= 0 and H, W >= 3");
          return splits(v, N, C, H, W, O);
        },
        arg("N"), arg("C"), arg("H"), arg("W"), arg("O"), py::kw_only(),
        arg("version") = kConv3x3DefaultVersion,
        "Slices (split-K) the GEMM versions sum separately for this direction of x[N,C,H,W] -> O "
        "channels (only where the output tiles are too few), by rule (a measured plan in the table "
        "of tuned plans overrides it); 1 for v1 and v2.");
  }
  // Plans by measurement (launchers.h, "Plans measured instead of ruled"); unet_cuda.ops.cuda
  // wraps them (autotune, tuned_plans, set_tuned_plans, ...).
  {
    auto key_of = [](const char* fn, const std::string& op, const std::string& version, int64_t M,
                     int64_t cols, int64_t K, int64_t images) {
      return GemmPlanKey{op, conv3x3_version_arg(fn, version), M, cols, K, images};
    };
    auto plan_tuple = [](const GemmPlan& p) { return py::make_tuple(p.bm, p.bn, p.splits); };
    auto version_of = [](Conv3x3Version version) {
      for (const Conv3x3VersionName& v : kConv3x3Versions)
        if (v.version == version) return std::string(v.name);
      return std::string("unknown");
    };
    py::list ops;
    for (const char* op : kGemmPlanOps) ops.append(op);
    m.attr("GEMM_PLAN_OPS") = py::tuple(ops);
    m.def("set_gemm_autotune", &set_gemm_autotune, arg("enabled"),
          "With True, the first call of each GEMM (v3-v6) times every plan of its version and "
          "keeps the fastest in the table of tuned plans (inside a CUDA graph capture, where "
          "nothing can be timed, the rule's plan enters untimed); with False, plans come from the "
          "table or the rule.");
    m.def("gemm_autotune", &gemm_autotune, "Whether autotuning is on.");
    m.def(
        "gemm_plan_candidates",
        [key_of, plan_tuple](const std::string& op, const std::string& version, int64_t M,
                             int64_t cols, int64_t K, int64_t images) {
          py::list plans;
          for (const GemmPlan& p :
               gemm_plan_candidates(key_of("gemm_plan_candidates", op, version, M, cols, K, images)))
            plans.append(plan_tuple(p));
          return plans;
        },
        arg("op"), arg("version"), arg("M"), arg("cols"), arg("K"), arg("images") = 1,
        "Every plan (bm, bn, splits) the version offers this GEMM, the rule's first. For a "
        "weight gradient K is the pixels of one image and `images` the images.");
    m.def(
        "tuned_gemm_plans",
        [plan_tuple, version_of]() {
          py::list entries;
          for (const TunedGemmPlan& t : tuned_gemm_plans()) {
            py::dict e;
            e["op"] = t.key.op;
            e["version"] = version_of(t.key.version);
            e["M"] = t.key.M;
            e["cols"] = t.key.cols;
            e["K"] = t.key.K;
            e["images"] = t.key.images;
            e["plan"] = plan_tuple(t.plan);
            e["rule"] = plan_tuple(t.rule);
            e["ms"] = t.ms;
            e["rule_ms"] = t.rule_ms;
            e["candidates"] = t.candidates;
            e["uses"] = t.uses;
            py::list timed;
            for (const auto& [p, ms] : t.timed) timed.append(py::make_tuple(p.bm, p.bn, p.splits, ms));
            e["timed"] = timed;
            entries.append(e);
          }
          return entries;
        },
        "The table: one dict per GEMM (op, version, M, cols, K, images, plan, rule, ms, rule_ms, "
        "candidates, uses, timed); ms and rule_ms are NaN, candidates 0, where a plan was set by "
        "hand or entered inside a CUDA graph capture; uses counts the calls that ran the plan; "
        "timed lists every plan timed as (bm, bn, splits, ms).");
    m.def(
        "set_tuned_gemm_plan",
        [key_of](const std::string& op, const std::string& version, int64_t M, int64_t cols,
                 int64_t K, int64_t images, int bm, int bn, int splits) {
          set_tuned_gemm_plan(key_of("set_tuned_gemm_plan", op, version, M, cols, K, images),
                              {bm, bn, splits});
        },
        arg("op"), arg("version"), arg("M"), arg("cols"), arg("K"), arg("images"), arg("bm"),
        arg("bn"), arg("splits"),
        "Enters a plan for one GEMM: one of gemm_plan_candidates' (ValueError otherwise).");
    m.def("clear_tuned_gemm_plans", &clear_tuned_gemm_plans, "Empties the table.");
  }
  m.def(
      "conv3x3_version_available",
      [](const std::string& version) {
        const Conv3x3Version v = conv3x3_version_arg("conv3x3_version_available", version);
        py::gil_scoped_release no_gil;
        return conv3x3_version_available(v);
      },
      arg("version"),
      "Whether the kernel version can run on the current device (v6_tf32_wgmma: a Hopper GPU and "
      "a build with sm_90a code); every other version runs on any GPU the module was built for.");
  m.def(
      "conv3x3_tap_major",
      [](const std::string& version, int channels) {
        return conv3x3_tap_major(conv3x3_version_arg("conv3x3_tap_major", version), channels);
      },
      arg("version"), arg("channels"),
      "Whether the version walks K tap by tap (within chunks of 32 channels) for a convolution summing over "
      "`channels` channels (C for the forward, O for the backward data): v4-v6 where it is a "
      "multiple of 32 (and one image holds fewer than 2^31 elements, which the launchers check).");
  m.def("conv3x3_concat_forward", &conv3x3_concat_forward, arg("up"), arg("skip"), arg("w"),
        arg("b"), arg("y"), arg("relu"), py::kw_only(), arg("stream"), arg("version"),
        "y[N,O,H-2,W-2] = valid 3x3 conv of [up, centre crop of skip] (never stored) with "
        "w[O,Cu+Cs,3,3] plus b[O], ReLU if relu; `version`: a GEMM version (v3-v5).");
  m.def("conv3x3_concat_backward_data", &conv3x3_concat_backward_data, arg("dy"), arg("w"),
        arg("dup"), arg("dskip"), py::kw_only(), arg("stream"), arg("version"),
        arg("up_relu_mask") = py::none(), arg("skip_relu_mask") = py::none(),
        "dup[N,Cu,H,W] and dskip[N,Cs,Hs,Ws] (0 outside the crop window) from dy[N,O,H-2,W-2] "
        "and w[O,Cu+Cs,3,3]; with up_relu_mask (skip_relu_mask), of dup's (dskip's) shape, dup "
        "(dskip) is 0 where the mask is <= 0.");
  m.def("conv3x3_concat_backward_weight", &conv3x3_concat_backward_weight, arg("up"),
        arg("skip"), arg("dy"), arg("dw"), arg("db"), py::kw_only(), arg("stream"),
        arg("version"),
        "dw[O,Cu+Cs,3,3] and db[O] from up, skip and dy[N,O,H-2,W-2] (deterministic).");
  m.def(
      "conv1x1_forward",
      [](py::handle x, py::handle w, py::handle b, py::handle y, std::uintptr_t stream) {
        conv_forward(kConv1x1, &conv1x1_forward_launch, false, x, w, b, y, stream);
      },
      arg("x"), arg("w"), arg("b"), arg("y"), py::kw_only(), arg("stream"),
      "y[N,O,H,W] = 1x1 conv of x[N,C,H,W] with w[O,C,1,1] plus b[O].");
  m.def(
      "conv1x1_backward_data",
      [](py::handle dy, py::handle w, py::handle dx, std::uintptr_t stream, py::handle relu_mask) {
        conv_backward_data(kConv1x1, &launch_conv1x1_backward_data, dy, w, dx, relu_mask, stream);
      },
      arg("dy"), arg("w"), arg("dx"), py::kw_only(), arg("stream"), arg("relu_mask") = py::none(),
      "dx[N,C,H,W] from dy[N,O,H,W] and w[O,C,1,1]; with relu_mask (dx's shape), dx is 0 where "
      "relu_mask <= 0.");
  m.def(
      "conv1x1_backward_weight",
      [](py::handle x, py::handle dy, py::handle dw, py::handle db, std::uintptr_t stream) {
        conv_backward_weight(kConv1x1, &launch_conv1x1_backward_weight, x, dy, dw, db, stream);
      },
      arg("x"), arg("dy"), arg("dw"), arg("db"), py::kw_only(), arg("stream"),
      "dw[O,C,1,1] and db[O] from x[N,C,H,W] and dy[N,O,H,W] (deterministic).");
  // upconv2x2 takes conv3x3's keyword `version` too: the GEMM versions (v3-v6) run it as a GEMM
  // with the same kernels, v1 and v2 with its direct kernels.
  m.def(
      "upconv2x2_forward",
      [](py::handle x, py::handle w, py::handle b, py::handle y, std::uintptr_t stream,
         const std::string& version) {
        const Conv3x3Version v = conv3x3_version_arg("upconv2x2_forward", version);
        conv_forward(
            kUpconv2x2,
            [v](const float* x, const float* w, const float* b, float* y, int N, int C, int H,
                int W, int O, bool /*relu*/, cudaStream_t s) {
              launch_upconv2x2_forward(x, w, b, y, N, C, H, W, O, v, s);
            },
            false, x, w, b, y, stream);
      },
      arg("x"), arg("w"), arg("b"), arg("y"), py::kw_only(), arg("stream"),
      arg("version") = kConv3x3DefaultVersion,
      "y[N,O,2H,2W] = 2x2 stride-2 transposed conv of x[N,C,H,W] with w[O,C,2,2] plus b[O]; "
      "`version`: a conv3x3 version (CONV3X3_VERSIONS), v3-v6 run it as a GEMM.");
  m.def(
      "upconv2x2_backward_data",
      [](py::handle dy, py::handle w, py::handle dx, std::uintptr_t stream,
         const std::string& version, py::handle relu_mask) {
        const Conv3x3Version v = conv3x3_version_arg("upconv2x2_backward_data", version);
        conv_backward_data(
            kUpconv2x2,
            [v](const float* dy, const float* w, const float* mask, float* dx, int N, int C, int H,
                int W, int O, cudaStream_t s) {
              launch_upconv2x2_backward_data(dy, w, mask, dx, N, C, H, W, O, v, s);
            },
            dy, w, dx, relu_mask, stream);
      },
      arg("dy"), arg("w"), arg("dx"), py::kw_only(), arg("stream"),
      arg("version") = kConv3x3DefaultVersion, arg("relu_mask") = py::none(),
      "dx[N,C,H,W] from dy[N,O,2H,2W] and w[O,C,2,2]; `version` as for upconv2x2_forward; with "
      "relu_mask (dx's shape), dx is 0 where relu_mask <= 0.");
  m.def(
      "upconv2x2_backward_weight",
      [](py::handle x, py::handle dy, py::handle dw, py::handle db, std::uintptr_t stream,
         const std::string& version) {
        const Conv3x3Version v = conv3x3_version_arg("upconv2x2_backward_weight", version);
        conv_backward_weight(
            kUpconv2x2,
            [v](const float* x, const float* dy, float* dw, float* db, int N, int C, int H, int W,
                int O, cudaStream_t s) {
              launch_upconv2x2_backward_weight(x, dy, dw, db, N, C, H, W, O, v, s);
            },
            x, dy, dw, db, stream);
      },
      arg("x"), arg("dy"), arg("dw"), arg("db"), py::kw_only(), arg("stream"),
      arg("version") = kConv3x3DefaultVersion,
      "dw[O,C,2,2] and db[O] from x[N,C,H,W] and dy[N,O,2H,2W] (deterministic); `version` as "
      "for upconv2x2_forward.");

  // Pooling, skip connections, element-wise ops.
  m.def("maxpool2x2_forward", &maxpool2x2_forward, arg("x"), arg("y"), arg("argmax"),
        py::kw_only(), arg("stream"),
        "y and uint8 argmax [N,C,H/2,W/2] from x[N,C,H,W] (H, W even; first maximum wins).");
  m.def("maxpool2x2_backward", &maxpool2x2_backward, arg("dy"), arg("argmax"), arg("dx"),
        py::kw_only(), arg("stream"), arg("relu_mask") = py::none(), arg("accumulate") = false,
        "dx[N,C,2h,2w] from dy and argmax [N,C,h,w]; with relu_mask (dy's shape: the pool's "
        "output y, where x is a ReLU's output), dx is also 0 where it is <= 0; with accumulate, "
        "dx += that gradient instead.");
  m.def("crop_concat_forward", &crop_concat_forward, arg("up"), arg("skip"), arg("y"),
        py::kw_only(), arg("stream"),
        "y[N,Cu+Cs,H,W] = [up, centre crop of skip[N,Cs,Hs,Ws]].");
  m.def("crop_concat_backward", &crop_concat_backward, arg("dy"), arg("dup"), arg("dskip"),
        py::kw_only(), arg("stream"),
        "dup[N,Cu,H,W] and dskip[N,Cs,Hs,Ws] (zero outside the crop) from dy[N,Cu+Cs,H,W].");
  m.def("relu_backward", &relu_backward, arg("y"), arg("dy"), arg("dx"), py::kw_only(),
        arg("stream"), "dx = dy where y > 0, else 0.");
  m.def("accumulate_", &accumulate, arg("dst"), arg("src"), py::kw_only(), arg("stream"),
        "dst += src, in place.");

  // Loss, dropout, optimizer.
  m.def("softmax_xent_forward", &softmax_xent_forward, arg("logits"), arg("labels"),
        arg("weights"), arg("loss"), arg("probs"), py::kw_only(), arg("stream"),
        "probs[N,K,H,W] and the 0-d weighted mean cross-entropy loss (deterministic).");
  m.def("softmax_xent_backward", &softmax_xent_backward, arg("probs"), arg("labels"),
        arg("weights"), arg("dlogits"), arg("dloss"), py::kw_only(), arg("stream"),
        "dlogits = dloss * w * (p - onehot(label)) / (N*H*W); NaN at illegal labels.");
  m.def("dropout_mask", &dropout_mask, arg("mask"), arg("p"), arg("seed"), py::kw_only(),
        arg("stream"),
        "uint8 mask (1 keeps) from the splitmix64 hash of docs/OPS.md; seed an int in "
        "[0, 2**64) or a 0-d uint64 CUDA array read when the kernel runs.");
  m.def(
      "dropout_forward",
      [](py::handle x, py::handle mask, py::handle y, double p, std::uintptr_t stream) {
        dropout_apply("dropout_forward", &launch_dropout_forward, "x", "y", x, mask, y, p, stream);
      },
      arg("x"), arg("mask"), arg("y"), arg("p"), py::kw_only(), arg("stream"),
      "y = x * mask / (1 - p).");
  m.def(
      "dropout_backward",
      [](py::handle dy, py::handle mask, py::handle dx, double p, std::uintptr_t stream) {
        dropout_apply("dropout_backward", &launch_dropout_backward, "dy", "dx", dy, mask, dx, p,
                      stream);
      },
      arg("dy"), arg("mask"), arg("dx"), arg("p"), py::kw_only(), arg("stream"),
      "dx = dy * mask / (1 - p).");
  m.def(
      "dropout_seeded_forward",
      [](py::handle x, py::handle y, double p, py::handle seed, std::uintptr_t stream) {
        dropout_seeded("dropout_seeded_forward", "x", "y", x, y, p, seed, stream);
      },
      arg("x"), arg("y"), arg("p"), arg("seed"), py::kw_only(), arg("stream"),
      "y = x * mask / (1 - p) with dropout_mask's mask of (p, seed), hashed where it is applied "
      "and never stored; seed as for dropout_mask.");
  m.def(
      "dropout_seeded_backward",
      [](py::handle dy, py::handle dx, double p, py::handle seed, std::uintptr_t stream) {
        dropout_seeded("dropout_seeded_backward", "dy", "dx", dy, dx, p, seed, stream);
      },
      arg("dy"), arg("dx"), arg("p"), arg("seed"), py::kw_only(), arg("stream"),
      "dx = dy * mask / (1 - p), the mask of dropout_seeded_forward with the same p and seed.");
  m.def("sgd_momentum_update_", &sgd_momentum_update, arg("param"), arg("grad"), arg("velocity"),
        arg("lr"), arg("momentum"), arg("weight_decay"), py::kw_only(), arg("stream"),
        "In place: v = momentum*v + lr*(grad + weight_decay*param); param -= v; lr a number or "
        "a 0-d float32 CUDA array read when the kernel runs.");
  m.def("sgd_momentum_update_multi_", &sgd_momentum_update_multi, arg("params"), arg("grads"),
        arg("velocities"), arg("lr"), arg("momentum"), arg("weight_decay"), py::kw_only(),
        arg("stream"),
        "sgd_momentum_update_ of every (params[i], grads[i], velocities[i]) in one launch per 32 "
        "of them; the same bits.");

  // Augmentation.
  m.def("augment_warp", &augment_warp, arg("image"), arg("labels"), arg("weights"), arg("coarse"),
        arg("image_out"), arg("labels_out"), arg("weights_out"), arg("quarter_turns"),
        arg("flip_rows"), arg("flip_columns"), arg("gamma"), arg("contrast"), arg("brightness"),
        py::kw_only(), arg("stream"),
        "Elastic warp (Keys-bicubic field from coarse[2,gy,gx]), flips, quarter turns and gray "
        "values of image, labels (nearest) and weights (bilinear) [H,W], in one pass.");
}
