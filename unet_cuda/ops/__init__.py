"""The op functions, dispatched to a backend by the type of their arrays.

``unet_cuda.ops.conv3x3_forward(x, w, b)`` runs the NumPy reference when ``x`` is a NumPy array,
and our CUDA kernels (``unet_cuda.ops.cuda``) when ``x`` is a CuPy array. docs/OPS.md is the
contract both backends follow. Besides the ops this module has the few device helpers that the
rest of the package needs (moving arrays, allocating zeros), so that nothing else imports CuPy.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from types import ModuleType

import numpy as np

from . import reference
from .reference import __all__ as OP_NAMES

__all__ = list(OP_NAMES) + [
    "OP_NAMES", "backend_for", "cuda_status", "cuda_available", "array_module",
    "to_device", "to_numpy", "device_of", "CudaUnavailableError", "is_out_of_memory",
    "PRECISIONS", "set_precision", "restoring_precision", "choose_device", "default_precision",
]

# The precision modes of the CUDA backend (unet_cuda.ops.cuda.PRECISION_VERSIONS says which 3x3
# convolution kernel each runs). The NumPy reference computes in float32/float64: always "fp32".
PRECISIONS = ("fp32", "tf32", "bf16")


class CudaUnavailableError(RuntimeError):
    """The CUDA backend was asked for but cannot run here (no CuPy, no GPU, or no built extension)."""


@functools.lru_cache(maxsize=1)
def _cupy() -> ModuleType | None:
    try:
        import cupy  # noqa: PLC0415
    except Exception:  # ImportError, or a CuPy that finds no CUDA libraries
        return None
    return cupy


@functools.lru_cache(maxsize=1)
def cuda_status() -> str | None:
    """None when the CUDA backend can run here, else a sentence saying why not."""
    cupy = _cupy()
    if cupy is None:
        return "CuPy is not installed (pip install cupy-cuda13x, or the wheel for your CUDA version)"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # no driver, no device
        return f"no CUDA device is visible ({exc.__class__.__name__}: {exc})"
    if count < 1:
        return "no CUDA device is visible"
    try:
        from unet_cuda import _C  # noqa: F401, PLC0415
    except ImportError as exc:
        return (f"the CUDA extension unet_cuda._C is not built ({exc}); reinstall with a CUDA "
                "toolkit present: pip install -e .")
    return None


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a device out-of-memory error, whether CuPy's allocator or one of our launchers raised it."""
    return "OutOfMemory" in type(exc).__name__ or "out of memory" in str(exc).lower()


def cuda_available() -> bool:
    return cuda_status() is None


def choose_device(requested: str | None, hint: str = "Use --device cpu.") -> str:
    """The device of a command line's ``--device``: "cpu" as asked, "cuda" as asked where CUDA can
    run (else a CudaUnavailableError saying why, then ``hint``), or the GPU when there is one."""
    if requested == "cpu":
        return "cpu"
    why = cuda_status()
    if requested == "cuda" and why is not None:
        raise CudaUnavailableError(f"--device cuda was asked for but CUDA cannot run here: {why}. {hint}")
    return "cuda" if why is None else "cpu"


def default_precision(device: str) -> str:
    """TF32 tensor cores on the GPU (the default of cuDNN too); the CPU reference is FP32."""
    return "tf32" if device == "cuda" else "fp32"


@functools.lru_cache(maxsize=1)
def _cuda_backend() -> ModuleType:
    why = cuda_status()
    if why is not None:
        raise CudaUnavailableError(f"the CUDA backend is unavailable: {why}")
    from . import cuda  # noqa: PLC0415
    return cuda


def _is_cupy_array(a) -> bool:
    cupy = _cupy()
    return cupy is not None and isinstance(a, cupy.ndarray)


def backend_for(array) -> ModuleType:
    """The backend module that computes ops on ``array``: the reference or the CUDA kernels."""
    if _is_cupy_array(array):
        return _cuda_backend()
    if isinstance(array, np.ndarray):
        return reference
    raise TypeError(f"expected a NumPy or CuPy array, got {type(array).__name__}")


def array_module(array) -> ModuleType:
    """``numpy`` or ``cupy``, whichever holds ``array``."""
    return _cupy() if _is_cupy_array(array) else np


def device_of(array) -> str:
    return "cuda" if _is_cupy_array(array) else "cpu"


def to_device(array, device: str):
    """Copy ``array`` to ``"cpu"`` (NumPy) or ``"cuda"`` (CuPy); no copy when it is already there."""
    if device == "cpu":
        return to_numpy(array)
    if device == "cuda":
        if _is_cupy_array(array):
            return array
        _cuda_backend()  # raises a clear error when CUDA cannot run
        return _cupy().asarray(np.ascontiguousarray(array))
    raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")


def to_numpy(array) -> np.ndarray:
    if _is_cupy_array(array):
        return array.get()
    return np.asarray(array)


def _make_dispatcher(name: str):
    def op(*args, **kwargs):
        return getattr(backend_for(args[0]), name)(*args, **kwargs)

    op.__name__ = name
    op.__qualname__ = name
    op.__doc__ = getattr(reference, name).__doc__
    return op


for _name in OP_NAMES:
    if _name not in ("dropout_mask", "sgd_momentum_update_multi_"):
        globals()[_name] = _make_dispatcher(_name)


def sgd_momentum_update_multi_(params, grads, velocities, lr, momentum, weight_decay):
    """``sgd_momentum_update_`` of every ``(params[i], grads[i], velocities[i])`` on the backend of
    ``params[0]`` (the reference, which checks the arguments all the same, for none); see
    docs/OPS.md."""
    params = reference.array_sequence("sgd_momentum_update_multi_", "params", params)
    backend = backend_for(params[0]) if params else reference
    return backend.sgd_momentum_update_multi_(params, grads, velocities, lr, momentum, weight_decay)


def dropout_mask(shape, p, seed, *, like):
    """The dropout keep-mask (uint8) on the backend of the array ``like``; see docs/OPS.md."""
    return backend_for(like).dropout_mask(shape, p, seed)


def set_precision(name: str, device: str) -> None:
    """Selects the precision of the 3x3 convolutions on ``device``: any of ``PRECISIONS`` on
    "cuda"; "fp32" only on "cpu", whose reference has no reduced precision (a ValueError says so)."""
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    if device == "cpu":
        if name != "fp32":
            raise ValueError(f"precision {name} runs on the GPU's tensor cores; the CPU backend "
                             "computes in fp32 only (use --device cuda, or --precision fp32)")
        return
    _cuda_backend().set_precision(name)


def set_autotune(enabled: bool, device: str) -> None:
    """Autotuning of the GPU's GEMM plans (``unet_cuda.ops.cuda.set_autotune``) on or off; on
    "cpu", where no GEMM kernel runs, asking for it is a ValueError."""
    if device == "cpu":
        if enabled:
            raise ValueError("autotuning times the GPU's convolution kernels; the CPU backend has none "
                             "(use --device cuda, or drop --autotune)")
        return
    _cuda_backend().set_autotune(enabled)


def load_tuned_plans(path, device: str) -> int:
    """Enters the GEMM plans saved in ``path`` (``unet_cuda.ops.cuda.load_tuned_plans``) and returns
    how many; on "cpu" a ValueError."""
    if device == "cpu":
        raise ValueError("saved GEMM plans choose the GPU's convolution kernels; the CPU backend has none "
                         "(use --device cuda, or drop --plans)")
    return _cuda_backend().load_tuned_plans(path)


def set_tuned_plans(plans, device: str) -> int:
    """Enters GEMM plans (``unet_cuda.ops.cuda.set_tuned_plans``: each checked, a ValueError names a
    bad one) and returns how many; on "cpu" a ValueError."""
    if device == "cpu":
        raise ValueError("GEMM plans choose the GPU's convolution kernels; the CPU backend has none")
    return _cuda_backend().set_tuned_plans(plans)


def tuned_plans() -> list[dict]:
    """The CUDA backend's table of GEMM plans (``unet_cuda.ops.cuda.tuned_plans``); empty where
    that backend was never loaded."""
    cuda = sys.modules.get(f"{__name__}.cuda")
    return cuda.tuned_plans() if cuda is not None else []


def save_tuned_plans(path) -> int:
    """Writes the CUDA backend's table of GEMM plans to ``path`` (JSON) and returns its entries."""
    return _cuda_backend().save_tuned_plans(path)


@contextlib.contextmanager
def restoring_precision():
    """Within this block ``set_precision``, ``set_autotune`` and ``load_tuned_plans`` may be called
    freely; on leaving it the CUDA backend's conv3x3 version, autotuning and table of GEMM plans are
    what they were before (the command lines use it, so that running ``main()`` inside a program
    leaves that program's settings alone; the table's plans come back without their timings)."""
    cuda = sys.modules.get(f"{__name__}.cuda")
    previous = cuda.get_conv3x3_version() if cuda is not None else None
    autotune = cuda.get_autotune() if cuda is not None else False
    plans = cuda.tuned_plans() if cuda is not None else []
    try:
        yield
    finally:
        cuda = sys.modules.get(f"{__name__}.cuda")
        if cuda is not None:
            cuda.set_conv3x3_version(previous or cuda.STARTUP_CONV3X3_VERSION)
            cuda.set_autotune(autotune)
            cuda.clear_tuned_plans()
            cuda.set_tuned_plans(plans)
