"""CUDA backend of the op contract (docs/OPS.md): CuPy arrays in, CuPy arrays out, float32.

Every function has the name, the arguments and the results of its NumPy twin in
``unet_cuda.ops.reference``. It allocates its outputs, then calls the launcher binding of the same
name in ``unet_cuda._C`` on CuPy's current stream. The bindings check every argument (dtype, shape
consistency, C-contiguity, device memory) and raise ``ValueError`` naming the op and the argument;
this module only works out the output shapes. Nothing here synchronises with the device: the loss
stays a 0-d CuPy array until the caller reads it with ``float(loss)``.

Unlike the reference, inputs are not converted: pass float32 arrays (int32 labels, uint8 masks and
argmax), C-contiguous, on the current device.

The 3x3 convolution has several kernel versions (``CONV3X3_VERSIONS``, docs/CONV3X3.md); the one
its ops run is a setting of this module: ``set_conv3x3_version(name)``, ``get_conv3x3_version()``,
``use_conv3x3_version(name)`` for a block, or the environment variable ``UNET_CUDA_CONV3X3`` read at
import. The default is ``"v1_direct"``. The precision modes (``PRECISIONS``: fp32, tf32, bf16) name
the version each runs: ``set_precision(name)``, ``get_precision()``, ``use_precision(name)``.
"""

from __future__ import annotations

import contextlib
import operator
import os

import cupy
import numpy

try:
    from unet_cuda import _C
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        f"the CUDA backend needs the compiled extension unet_cuda._C, which does not import ({exc}). "
        "Build it where the CUDA toolkit (nvcc) is installed: pip install --no-build-isolation -e ."
    ) from exc

from .. import plans as _plans  # noqa: E402
from .reference import array_sequence  # noqa: E402
from .reference import __all__  # noqa: E402  the same functions, by the contract (docs/OPS.md)


def _empty(shape, dtype=cupy.float32):
    """Every output of this module is allocated here (tests replace it to poison outputs)."""
    return cupy.empty(shape, dtype=dtype)


def _stream() -> int:
    return cupy.cuda.get_current_stream().ptr


def _shape(op: str, name: str, a, ndim: int | None = None) -> tuple:
    """The shape of ``a``, which must be an array (of ``ndim`` dimensions when given)."""
    shape = getattr(a, "shape", None)
    if shape is None:
        raise TypeError(f"{op}: argument {name} must be a CuPy array, got {type(a).__name__}")
    if ndim is not None and len(shape) != ndim:
        raise ValueError(f"{op}: argument {name} must have {ndim} dimensions, got shape {tuple(shape)}")
    return tuple(shape)


def _size(n: int) -> int:
    """An output extent; a negative one (from an input too small) becomes 0, so that the binding,
    not the allocator, reports the bad input."""
    return max(int(n), 0)


# ----------------------------------------------------------------------------------------------
# Convolutions
# ----------------------------------------------------------------------------------------------

# The kernel versions of the 3x3 convolution (csrc/conv3x3.cu, docs/CONV3X3.md), from the one
# registry in the extension: "v1_direct", "v2_smem", "v3_igemm", "v4_tf32_mma", "v5_bf16_mma". The
# version is a setting of this backend, not an argument of the ops (the reference has no such
# thing); the precision modes below name three of them.
CONV3X3_VERSIONS: tuple[str, ...] = tuple(_C.CONV3X3_VERSIONS)
# v1_direct stays the default of this module until a GPU run has verified v2-v5 against the
# reference (tests/test_cuda_ops.py runs every conv3x3 test for every version). v4_tf32_mma is
# TF32: relative errors near 1e-3, like cuDNN's default; v5_bf16_mma near 1e-2; v1-v3 are FP32.
DEFAULT_CONV3X3_VERSION = "v1_direct"
# Environment override, read once when this module is imported.
CONV3X3_VERSION_ENV = "UNET_CUDA_CONV3X3"


def _valid_conv3x3_version(name, where: str) -> str:
    if not isinstance(name, str) or name not in CONV3X3_VERSIONS:
        valid = ", ".join(repr(v) for v in CONV3X3_VERSIONS)
        raise ValueError(f"{where}: the conv3x3 version must be one of {valid}, got {name!r}")
    return name


_conv3x3_version = _valid_conv3x3_version(
    os.environ.get(CONV3X3_VERSION_ENV, DEFAULT_CONV3X3_VERSION), f"${CONV3X3_VERSION_ENV}")
STARTUP_CONV3X3_VERSION = _conv3x3_version  # the setting at import (the default, or the variable's)


def conv3x3_version_available(name: str) -> bool:
    """Whether kernel version ``name`` runs on the current device: ``v6_tf32_wgmma``,
    ``v7_tf32_halo`` and ``v8_bf16_halo`` need a Hopper GPU (compute capability 9.0) and a build
    with sm_90a code; the others (``v9_fp32_halo`` too) run on any GPU of the build."""
    return bool(_C.conv3x3_version_available(_valid_conv3x3_version(name, "conv3x3_version_available")))


def conv3x3_tap_major(name: str, channels: int) -> bool:
    """Whether kernel version ``name`` walks K tap by tap (in chunks of 32 channels, the weights rearranged)
    for a convolution summing over ``channels`` channels (C forward, O backward data): v4-v6 where
    ``channels`` is a multiple of 32 (v7's, v8's and v9's own kernels copy each input window once for
    all taps instead: False)."""
    return bool(_C.conv3x3_tap_major(_valid_conv3x3_version(name, "conv3x3_tap_major"), int(channels)))


def set_conv3x3_version(name: str) -> None:
    """Runs every later conv3x3 op of this backend with kernel version ``name``."""
    global _conv3x3_version
    _conv3x3_version = _valid_conv3x3_version(name, "set_conv3x3_version")


def get_conv3x3_version() -> str:
    """The kernel version the conv3x3 ops of this backend run."""
    return _conv3x3_version


@contextlib.contextmanager
def use_conv3x3_version(name: str):
    """``with use_conv3x3_version("v3_igemm"): ...`` runs the block with that version, then
    restores the previous one."""
    previous = get_conv3x3_version()
    set_conv3x3_version(name)
    try:
        yield
    finally:
        set_conv3x3_version(previous)


# The precision modes: which kernel version of the 3x3 convolution (96 % of the FLOPs) each one
# runs. Every buffer stays float32 in all three; what changes is what the multiplications see:
#   fp32  FP32 on the CUDA cores (v3_igemm, the fastest FP32 version),
#   tf32  the tensor cores on operands rounded to TF32 (10-bit mantissa), FP32 sums (v4_tf32_mma),
#   bf16  the tensor cores on operands rounded to bf16 (7-bit mantissa), FP32 sums (v5_bf16_mma).
# The 2x2 up-convolutions run the same version (v3-v6 run them on the same GEMM kernels,
# csrc/implicit_gemm.cuh); the other ops (1x1 convolution, pooling, loss, update) compute in FP32
# in every mode.
# PRECISION_VERSIONS is what each mode runs on any GPU (sm_80 on); precision_version() picks the
# version for the current GPU, which differs only where HOPPER_VERSIONS applies.
PRECISION_VERSIONS: dict[str, str] = {"fp32": "v3_igemm", "tf32": "v4_tf32_mma", "bf16": "v5_bf16_mma"}
PRECISIONS: tuple[str, ...] = tuple(PRECISION_VERSIONS)
# On a Hopper GPU with a build holding sm_90a code, tf32 runs the warpgroup MMA (v6_tf32_wgmma,
# TF32 by truncation): its training step took 38.9 ms against 47.0 ms with v4_tf32_mma on an H200
# (bench/results/results-f04c9a5-h200.json), and every GPU test passed with it there.
HOPPER_VERSIONS: dict[str, str] = {"tf32": "v6_tf32_wgmma"}
# What every version computes in.
CONV3X3_VERSION_PRECISION: dict[str, str] = {
    "v1_direct": "fp32", "v2_smem": "fp32", "v3_igemm": "fp32", "v4_tf32_mma": "tf32",
    "v5_bf16_mma": "bf16", "v6_tf32_wgmma": "tf32", "v7_tf32_halo": "tf32", "v8_bf16_halo": "bf16",
    "v9_fp32_halo": "fp32"}


def _valid_precision(name, where: str) -> str:
    if not isinstance(name, str) or name not in PRECISION_VERSIONS:
        raise ValueError(f"{where}: the precision must be one of "
                         f"{', '.join(repr(p) for p in PRECISIONS)}, got {name!r}")
    return name


def precision_version(name: str) -> str:
    """The kernel version precision ``name`` runs on the current GPU: ``HOPPER_VERSIONS[name]``
    where that version can run here, else ``PRECISION_VERSIONS[name]``."""
    name = _valid_precision(name, "precision_version")
    faster = HOPPER_VERSIONS.get(name)
    if faster is not None and conv3x3_version_available(faster):
        return faster
    return PRECISION_VERSIONS[name]


def set_precision(name: str) -> None:
    """Runs every later conv3x3 op in precision ``name`` ("fp32", "tf32" or "bf16"): sets the
    kernel version ``precision_version(name)``."""
    set_conv3x3_version(precision_version(_valid_precision(name, "set_precision")))


def get_precision() -> str:
    """What the conv3x3 ops compute in now (``CONV3X3_VERSION_PRECISION`` of the current version):
    "tf32" for v4 and v6, "bf16" for v5, "fp32" for v1-v3 (the default v1_direct included)."""
    return CONV3X3_VERSION_PRECISION.get(_conv3x3_version, "fp32")


@contextlib.contextmanager
def use_precision(name: str):
    """``with use_precision("bf16"): ...`` runs the block in that precision, then restores the
    previous kernel version."""
    with use_conv3x3_version(precision_version(_valid_precision(name, "use_precision"))):
        yield


# Plans by measurement (csrc/launchers.h, docs/CONV3X3.md "Plans by measurement"). Every GEMM of
# the GEMM versions (v3-v6: the 3x3 convolutions, plain and concatenated, and the up-convolutions)
# runs in a block tile with K split into slices, both chosen by fixed rules from the shapes: the
# same plan, and the same bits, on every GPU. With autotuning on, the first call of each GEMM times
# every plan its version offers on this GPU and keeps the fastest, as cudnn.benchmark does for
# cuDNN (inside a CUDA graph capture, where nothing can be timed, the rule's plan enters the table
# untimed); later calls with the same shapes read the table. Plans sum in other orders, so results
# differ in their last bits from the rule's (within the version's tolerance); save the table and
# set it again to repeat a run's plans exactly.

def set_autotune(enabled: bool) -> None:
    """Autotuning on (True) or off (False) for every later GEMM; the table stays."""
    _C.set_gemm_autotune(bool(enabled))


def get_autotune() -> bool:
    return bool(_C.gemm_autotune())


@contextlib.contextmanager
def autotuning(enabled: bool = True):
    """``with autotuning(): ...`` runs the block with autotuning on, then restores the setting."""
    previous = get_autotune()
    set_autotune(enabled)
    try:
        yield
    finally:
        set_autotune(previous)


def _finite_or_none(value):
    return value if value is not None and numpy.isfinite(value) else None


def tuned_plans() -> list[dict]:
    """The table: one dict per GEMM with its key (``op``, ``version``, ``M``, ``cols``, ``K``,
    ``images``), the ``plan`` its calls run and the rule's (``rule``), each a list
    ``[bm, bn, splits]``, their measured times ``ms`` and ``rule_ms`` (None where the plan was set
    by hand or entered in a graph capture), how many plans were timed (``candidates``) and each with
    its time (``timed``: ``[bm, bn, splits, ms]``), and the calls that ran the plan (``uses``).
    JSON-ready."""
    plans = []
    for entry in _C.tuned_gemm_plans():
        entry = dict(entry)
        entry["plan"], entry["rule"] = list(entry["plan"]), list(entry["rule"])
        entry["timed"] = [list(t) for t in entry["timed"]]
        entry["ms"], entry["rule_ms"] = _finite_or_none(entry["ms"]), _finite_or_none(entry["rule_ms"])
        plans.append(entry)
    return plans


def gemm_plan_candidates(op: str, version: str, M: int, cols: int, K: int, images: int = 1) -> list[tuple]:
    """Every plan ``(bm, bn, splits)`` that ``version`` offers one GEMM, the rule's first."""
    return [tuple(p) for p in _C.gemm_plan_candidates(op, version, int(M), int(cols), int(K), int(images))]


def set_tuned_plans(plans) -> int:
    """Enters plans into the table (entries as ``tuned_plans()`` returns them; other fields are
    ignored) and returns how many. Every entry is checked first (``unet_cuda.plans``): a missing or
    mistyped field, or a plan its version does not offer that GEMM, is a ValueError naming the
    entry, and then none is entered. An entry replaces the table's for the same GEMM."""
    checked = _plans.checked_entries(plans, _C.gemm_plan_candidates)
    for key, plan in checked:
        _C.set_tuned_gemm_plan(*key, *plan)
    return len(checked)


def clear_tuned_plans() -> None:
    """Empties the table: every GEMM plans by rule again (or is timed anew with autotuning on)."""
    _C.clear_tuned_gemm_plans()


def _device_name() -> str | None:
    try:
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    except Exception:  # no device: the file then names none
        return None
    name = props.get("name", b"")
    return name.decode(errors="replace") if isinstance(name, bytes) else str(name)


def save_tuned_plans(path) -> int:
    """Writes the table as JSON (with the GPU's name: plans are timed on one card) and returns how
    many entries it holds."""
    plans = tuned_plans()
    _plans.write_plans_file(path, plans, _device_name())
    return len(plans)


def load_tuned_plans(path) -> int:
    """Enters the plans of a file written by ``save_tuned_plans`` (set_tuned_plans checks each) and
    returns how many. A plan applies to the GEMM of its key alone: same op, version and dimensions
    (so the same tile size, batch and precision). Plans timed on another GPU still compute the same
    convolutions; they may just not be this card's fastest."""
    try:
        return set_tuned_plans(_plans.read_plans_file(path))
    except ValueError as exc:
        raise ValueError(f"load_tuned_plans: {exc}") from None


def conv3x3_forward(x, w, b, relu=False):
    n, _, h, width = _shape("conv3x3_forward", "x", x, 4)
    o = _shape("conv3x3_forward", "w", w, 4)[0]
    y = _empty((n, o, _size(h - 2), _size(width - 2)))
    _C.conv3x3_forward(x, w, b, y, bool(relu), stream=_stream(), version=_conv3x3_version)
    return y


def conv3x3_backward_data(dy, w, relu_mask=None):
    n, _, p, q = _shape("conv3x3_backward_data", "dy", dy, 4)
    c = _shape("conv3x3_backward_data", "w", w, 4)[1]
    dx = _empty((n, c, p + 2, q + 2))
    _C.conv3x3_backward_data(dy, w, dx, stream=_stream(), version=_conv3x3_version,
                             relu_mask=relu_mask)
    return dx


def conv3x3_backward_weight(x, dy):
    c = _shape("conv3x3_backward_weight", "x", x, 4)[1]
    o = _shape("conv3x3_backward_weight", "dy", dy, 4)[1]
    dw = _empty((o, c, 3, 3))
    db = _empty((o,))
    _C.conv3x3_backward_weight(x, dy, dw, db, stream=_stream(), version=_conv3x3_version)
    return dw, db


# The convolution of [up, centre crop of skip]: the GEMM versions read both inputs in place; with
# the others the concatenation is stored first (crop_concat_forward), then convolved.
CONV3X3_CONCAT_VERSIONS: tuple[str, ...] = tuple(_C.CONV3X3_CONCAT_VERSIONS)


def conv3x3_concat_forward(up, skip, w, b, relu=False):
    if _conv3x3_version not in CONV3X3_CONCAT_VERSIONS:
        return conv3x3_forward(crop_concat_forward(up, skip), w, b, relu)
    n, _, h, width = _shape("conv3x3_concat_forward", "up", up, 4)
    o = _shape("conv3x3_concat_forward", "w", w, 4)[0]
    y = _empty((n, o, _size(h - 2), _size(width - 2)))
    _C.conv3x3_concat_forward(up, skip, w, b, y, bool(relu), stream=_stream(), version=_conv3x3_version)
    return y


def _relu_masked(op: str, name: str, mask, grad):
    """``grad``, or ``relu_backward(mask, grad)`` for a mask of its shape (the unfused path)."""
    if mask is None:
        return grad
    if tuple(getattr(mask, "shape", ())) != tuple(grad.shape):
        raise ValueError(f"{op}: argument {name} must have shape {tuple(grad.shape)}, the gradient's, "
                         f"got {getattr(mask, 'shape', type(mask).__name__)}")
    return relu_backward(mask, grad)


def conv3x3_concat_backward_data(dy, w, skip_shape, up_relu_mask=None, skip_relu_mask=None):
    if _conv3x3_version not in CONV3X3_CONCAT_VERSIONS:
        op = "conv3x3_concat_backward_data"
        dup, dskip = crop_concat_backward(conv3x3_backward_data(dy, w), skip_shape)
        return (_relu_masked(op, "up_relu_mask", up_relu_mask, dup),
                _relu_masked(op, "skip_relu_mask", skip_relu_mask, dskip))
    n, _, p, q = _shape("conv3x3_concat_backward_data", "dy", dy, 4)
    c = _shape("conv3x3_concat_backward_data", "w", w, 4)[1]
    skip_shape = _skip_shape("conv3x3_concat_backward_data", skip_shape)
    dup = _empty((n, _size(c - skip_shape[1]), p + 2, q + 2))
    dskip = _empty(skip_shape)
    _C.conv3x3_concat_backward_data(dy, w, dup, dskip, stream=_stream(), version=_conv3x3_version,
                                    up_relu_mask=up_relu_mask, skip_relu_mask=skip_relu_mask)
    return dup, dskip


def conv3x3_concat_backward_weight(up, skip, dy):
    if _conv3x3_version not in CONV3X3_CONCAT_VERSIONS:
        return conv3x3_backward_weight(crop_concat_forward(up, skip), dy)
    cu = _shape("conv3x3_concat_backward_weight", "up", up, 4)[1]
    cs = _shape("conv3x3_concat_backward_weight", "skip", skip, 4)[1]
    o = _shape("conv3x3_concat_backward_weight", "dy", dy, 4)[1]
    dw = _empty((o, cu + cs, 3, 3))
    db = _empty((o,))
    _C.conv3x3_concat_backward_weight(up, skip, dy, dw, db, stream=_stream(), version=_conv3x3_version)
    return dw, db


def conv1x1_forward(x, w, b):
    n, _, h, width = _shape("conv1x1_forward", "x", x, 4)
    o = _shape("conv1x1_forward", "w", w, 4)[0]
    y = _empty((n, o, h, width))
    _C.conv1x1_forward(x, w, b, y, stream=_stream())
    return y


def conv1x1_backward_data(dy, w, relu_mask=None):
    n, _, h, width = _shape("conv1x1_backward_data", "dy", dy, 4)
    c = _shape("conv1x1_backward_data", "w", w, 4)[1]
    dx = _empty((n, c, h, width))
    _C.conv1x1_backward_data(dy, w, dx, stream=_stream(), relu_mask=relu_mask)
    return dx


def conv1x1_backward_weight(x, dy):
    c = _shape("conv1x1_backward_weight", "x", x, 4)[1]
    o = _shape("conv1x1_backward_weight", "dy", dy, 4)[1]
    dw = _empty((o, c, 1, 1))
    db = _empty((o,))
    _C.conv1x1_backward_weight(x, dy, dw, db, stream=_stream())
    return dw, db


def upconv2x2_forward(x, w, b):
    n, _, h, width = _shape("upconv2x2_forward", "x", x, 4)
    o = _shape("upconv2x2_forward", "w", w, 4)[0]
    y = _empty((n, o, 2 * h, 2 * width))
    _C.upconv2x2_forward(x, w, b, y, stream=_stream(), version=_conv3x3_version)
    return y


def upconv2x2_backward_data(dy, w, relu_mask=None):
    n, _, h2, w2 = _shape("upconv2x2_backward_data", "dy", dy, 4)
    c = _shape("upconv2x2_backward_data", "w", w, 4)[1]
    dx = _empty((n, c, h2 // 2, w2 // 2))
    _C.upconv2x2_backward_data(dy, w, dx, stream=_stream(), version=_conv3x3_version,
                               relu_mask=relu_mask)
    return dx


def upconv2x2_backward_weight(x, dy):
    c = _shape("upconv2x2_backward_weight", "x", x, 4)[1]
    o = _shape("upconv2x2_backward_weight", "dy", dy, 4)[1]
    dw = _empty((o, c, 2, 2))
    db = _empty((o,))
    _C.upconv2x2_backward_weight(x, dy, dw, db, stream=_stream(), version=_conv3x3_version)
    return dw, db


# ----------------------------------------------------------------------------------------------
# Pooling, skip connections, element-wise
# ----------------------------------------------------------------------------------------------

def relu_backward(y, dy):
    dx = _empty(_shape("relu_backward", "y", y))
    _C.relu_backward(y, dy, dx, stream=_stream())
    return dx


def maxpool2x2_forward(x):
    n, c, h, width = _shape("maxpool2x2_forward", "x", x, 4)
    y = _empty((n, c, h // 2, width // 2))
    argmax = _empty((n, c, h // 2, width // 2), dtype=cupy.uint8)
    _C.maxpool2x2_forward(x, y, argmax, stream=_stream())
    return y, argmax


def maxpool2x2_backward(dy, argmax, relu_mask=None, accumulate_into=None):
    n, c, h, width = _shape("maxpool2x2_backward", "dy", dy, 4)
    if accumulate_into is not None:  # its shape, dtype and layout: checked by the binding
        _C.maxpool2x2_backward(dy, argmax, accumulate_into, stream=_stream(), relu_mask=relu_mask,
                               accumulate=True)
        return accumulate_into
    dx = _empty((n, c, 2 * h, 2 * width))
    _C.maxpool2x2_backward(dy, argmax, dx, stream=_stream(), relu_mask=relu_mask)
    return dx


def crop_concat_forward(up, skip):
    n, cu, h, width = _shape("crop_concat_forward", "up", up, 4)
    cs = _shape("crop_concat_forward", "skip", skip, 4)[1]
    y = _empty((n, cu + cs, h, width))
    _C.crop_concat_forward(up, skip, y, stream=_stream())
    return y


def _skip_shape(op: str, skip_shape) -> tuple:
    """``skip_shape`` as a tuple of 4 non-negative ints, or a ValueError naming ``op``."""
    try:
        skip_shape = tuple(operator.index(s) for s in skip_shape)
    except TypeError:
        raise ValueError(f"{op}: skip_shape must be 4 ints (N, Cs, Hs, Ws), got {skip_shape!r}") from None
    if len(skip_shape) != 4 or min(skip_shape) < 0:
        raise ValueError(f"{op}: skip_shape must be 4 non-negative ints (N, Cs, Hs, Ws), got {skip_shape}")
    return skip_shape


def crop_concat_backward(dy, skip_shape):
    op = "crop_concat_backward"
    n, c_total, h, width = _shape(op, "dy", dy, 4)
    skip_shape = _skip_shape(op, skip_shape)
    dup = _empty((n, _size(c_total - skip_shape[1]), h, width))
    dskip = _empty(skip_shape)
    _C.crop_concat_backward(dy, dup, dskip, stream=_stream())
    return dup, dskip


def accumulate_(dst, src):
    _C.accumulate_(dst, src, stream=_stream())
    return dst


# ----------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------

def softmax_xent_forward(logits, labels, weights):
    probs = _empty(_shape("softmax_xent_forward", "logits", logits))
    loss = _empty(())
    _C.softmax_xent_forward(logits, labels, weights, loss, probs, stream=_stream())
    return loss, probs


def softmax_xent_backward(probs, labels, weights, dloss=1.0):
    """``dloss`` may be a number or a 0-d CuPy array (then it is applied on the device, unread)."""
    dlogits = _empty(_shape("softmax_xent_backward", "probs", probs))
    if isinstance(dloss, cupy.ndarray):
        if dloss.ndim != 0:
            raise ValueError(f"softmax_xent_backward: dloss must be a scalar or 0-d array, "
                             f"got shape {dloss.shape}")
        _C.softmax_xent_backward(probs, labels, weights, dlogits, 1.0, stream=_stream())
        dlogits *= dloss.astype(cupy.float32, copy=False)
    else:
        _C.softmax_xent_backward(probs, labels, weights, dlogits, float(dloss), stream=_stream())
    return dlogits


# ----------------------------------------------------------------------------------------------
# Dropout and the optimizer
# ----------------------------------------------------------------------------------------------

def _host_array_refused(op: str, name: str, value, dtype: str) -> None:
    """A NumPy array for a scalar that may live on the device is refused: it would be read on the host
    at call time (and frozen into a captured CUDA graph), not by the kernel when it runs."""
    if isinstance(value, numpy.ndarray):
        raise ValueError(f"{op}: argument {name} is a NumPy array (host memory, shape {value.shape}); "
                         f"pass a number, or a 0-d {dtype} CuPy array on the device")


def dropout_mask(shape, p, seed):
    """``seed``: an int, or a 0-d uint64 CuPy array that the kernel reads when it runs (a captured
    CUDA graph then draws each replay's mask from the value written there since)."""
    op = "dropout_mask"
    _host_array_refused(op, "seed", seed, "uint64")
    try:
        shape = (operator.index(shape),)
    except TypeError:
        try:
            shape = tuple(operator.index(s) for s in shape)
        except TypeError:
            raise ValueError(f"{op}: shape must be an int or a tuple of ints, got {shape!r}") from None
    if any(s < 0 for s in shape):
        raise ValueError(f"{op}: shape must be non-negative, got {shape}")
    mask = _empty(shape, dtype=cupy.uint8)
    _C.dropout_mask(mask, p, seed, stream=_stream())
    return mask


def dropout_forward(x, mask, p):
    y = _empty(_shape("dropout_forward", "x", x))
    _C.dropout_forward(x, mask, y, p, stream=_stream())
    return y


def dropout_backward(dy, mask, p):
    dx = _empty(_shape("dropout_backward", "dy", dy))
    _C.dropout_backward(dy, mask, dx, p, stream=_stream())
    return dx


def dropout_seeded_forward(x, p, seed):
    """``seed``: as for ``dropout_mask`` (an int, or a 0-d uint64 CuPy array read when the kernel
    runs)."""
    _host_array_refused("dropout_seeded_forward", "seed", seed, "uint64")
    y = _empty(_shape("dropout_seeded_forward", "x", x))
    _C.dropout_seeded_forward(x, y, p, seed, stream=_stream())
    return y


def dropout_seeded_backward(dy, p, seed):
    _host_array_refused("dropout_seeded_backward", "seed", seed, "uint64")
    dx = _empty(_shape("dropout_seeded_backward", "dy", dy))
    _C.dropout_seeded_backward(dy, dx, p, seed, stream=_stream())
    return dx


def sgd_momentum_update_(param, grad, velocity, lr, momentum, weight_decay):
    """``lr``: a number, or a 0-d float32 CuPy array that the kernel reads when it runs (a captured
    CUDA graph then uses each replay's rate). Never ``float(lr)`` of an array: that would read it on
    the host now, a synchronisation, and freeze the value into a captured graph."""
    _host_array_refused("sgd_momentum_update_", "lr", lr, "float32")
    rate = lr if isinstance(lr, cupy.ndarray) else float(lr)
    _C.sgd_momentum_update_(param, grad, velocity, rate, float(momentum), float(weight_decay),
                            stream=_stream())
    return None


def sgd_momentum_update_multi_(params, grads, velocities, lr, momentum, weight_decay):
    """``sgd_momentum_update_`` of every triple in one launch per 32 of them (the same bits); every
    array is checked before anything is launched. ``lr`` as for ``sgd_momentum_update_``."""
    op = "sgd_momentum_update_multi_"
    _host_array_refused(op, "lr", lr, "float32")
    rate = lr if isinstance(lr, cupy.ndarray) else float(lr)
    seqs = [array_sequence(op, name, value)
            for name, value in (("params", params), ("grads", grads), ("velocities", velocities))]
    _C.sgd_momentum_update_multi_(*seqs, rate, float(momentum), float(weight_decay), stream=_stream())
    return None


# ----------------------------------------------------------------------------------------------
# Augmentation
# ----------------------------------------------------------------------------------------------

def augment_warp(image, labels, weights, coarse, quarter_turns=0, flip_rows=False, flip_columns=False,
                 gamma=1.0, contrast=1.0, brightness=0.0):
    """Outputs of the source's shape: image and weights float32, labels int32 (one kernel, csrc/warp.cu)."""
    shape = _shape("augment_warp", "image", image, 2)
    image_out = _empty(shape)
    labels_out = _empty(shape, dtype=cupy.int32)
    weights_out = _empty(shape)
    _C.augment_warp(image, labels, weights, coarse, image_out, labels_out, weights_out, quarter_turns,
                    bool(flip_rows), bool(flip_columns), float(gamma), float(contrast), float(brightness),
                    stream=_stream())
    return image_out, labels_out, weights_out
