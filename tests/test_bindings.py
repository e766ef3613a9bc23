"""Argument checks of the CUDA bindings (unet_cuda._C), which need no GPU.

Every binding validates its arguments before it touches the device, so these tests run wherever
the extension is built, GPU or not. The arrays are stand-ins: objects with a
``__cuda_array_interface__`` whose pointer is the buffer of a small NumPy array, so that even a call
that passed every check could only meet the final device-memory check (which rejects host memory on
a GPU machine and fails cleanly without a driver), never launch a kernel on stray memory.
"""

from __future__ import annotations

import ast
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

try:
    from unet_cuda import _C
except ImportError as exc:  # the extension is built only where nvcc exists
    _C = None
    _SKIP_REASON = f"the CUDA extension unet_cuda._C is not built ({exc})"
else:
    _SKIP_REASON = ""

pytestmark = pytest.mark.skipif(_C is None, reason=_SKIP_REASON or "unet_cuda._C is built")


class FakeCudaArray:
    """Just enough of a CUDA array for the bindings: the version-3 interface over host memory."""

    def __init__(self, shape, typestr="<f4", *, strides=None, ptr=None, read_only=False, **extra):
        self.shape = tuple(shape)
        self.typestr = typestr
        itemsize = int(typestr[2:]) if typestr[2:].isdigit() else 4
        # Backing store: keeps the pointer valid (and distinct from every other array's).
        self._buffer = np.zeros(max(1, int(math.prod(self.shape))) * itemsize, dtype=np.uint8)
        self.ptr = self._buffer.ctypes.data if ptr is None else ptr
        self.strides = strides
        self.read_only = read_only
        self.extra = extra

    @property
    def __cuda_array_interface__(self):
        iface = {
            "version": 3,
            "shape": self.shape,
            "typestr": self.typestr,
            "data": (self.ptr, self.read_only),
            "strides": self.strides,
        }
        iface.update(self.extra)
        return iface

    def like(self, **changes):
        """A new fake with the same fields except ``changes`` (its own buffer unless ``ptr`` given)."""
        fields = dict(shape=self.shape, typestr=self.typestr, strides=self.strides,
                      read_only=self.read_only, **self.extra)
        fields.update(changes)
        shape = fields.pop("shape")
        return FakeCudaArray(shape, **fields)


def f32(*shape):
    return FakeCudaArray(shape, "<f4")


def i32(*shape):
    return FakeCudaArray(shape, "<i4")


def u8(*shape):
    return FakeCudaArray(shape, "|u1")


# One valid call per op (keyword arguments of the binding, stream excluded), and its outputs.
VALID = {
    "conv3x3_forward": lambda: dict(x=f32(2, 3, 7, 6), w=f32(5, 3, 3, 3), b=f32(5),
                                    y=f32(2, 5, 5, 4), relu=True),
    "conv3x3_backward_data": lambda: dict(dy=f32(2, 5, 5, 4), w=f32(5, 3, 3, 3), dx=f32(2, 3, 7, 6),
                                          relu_mask=f32(2, 3, 7, 6)),
    "conv3x3_backward_weight": lambda: dict(x=f32(2, 3, 7, 6), dy=f32(2, 5, 5, 4),
                                            dw=f32(5, 3, 3, 3), db=f32(5)),
    "conv1x1_forward": lambda: dict(x=f32(2, 3, 5, 4), w=f32(2, 3, 1, 1), b=f32(2),
                                    y=f32(2, 2, 5, 4)),
    "conv1x1_backward_data": lambda: dict(dy=f32(2, 2, 5, 4), w=f32(2, 3, 1, 1), dx=f32(2, 3, 5, 4),
                                          relu_mask=f32(2, 3, 5, 4)),
    "conv1x1_backward_weight": lambda: dict(x=f32(2, 3, 5, 4), dy=f32(2, 2, 5, 4),
                                            dw=f32(2, 3, 1, 1), db=f32(2)),
    "upconv2x2_forward": lambda: dict(x=f32(2, 3, 3, 2), w=f32(4, 3, 2, 2), b=f32(4),
                                      y=f32(2, 4, 6, 4)),
    "upconv2x2_backward_data": lambda: dict(dy=f32(2, 4, 6, 4), w=f32(4, 3, 2, 2),
                                            dx=f32(2, 3, 3, 2), relu_mask=f32(2, 3, 3, 2)),
    "upconv2x2_backward_weight": lambda: dict(x=f32(2, 3, 3, 2), dy=f32(2, 4, 6, 4),
                                              dw=f32(4, 3, 2, 2), db=f32(4)),
    "maxpool2x2_forward": lambda: dict(x=f32(2, 3, 6, 4), y=f32(2, 3, 3, 2), argmax=u8(2, 3, 3, 2)),
    "maxpool2x2_backward": lambda: dict(dy=f32(2, 3, 3, 2), argmax=u8(2, 3, 3, 2),
                                        dx=f32(2, 3, 6, 4), relu_mask=f32(2, 3, 3, 2)),
    "crop_concat_forward": lambda: dict(up=f32(2, 3, 4, 5), skip=f32(2, 2, 8, 7), y=f32(2, 5, 4, 5)),
    "crop_concat_backward": lambda: dict(dy=f32(2, 5, 4, 5), dup=f32(2, 3, 4, 5),
                                         dskip=f32(2, 2, 8, 7)),
    "conv3x3_concat_forward": lambda: dict(up=f32(2, 3, 7, 6), skip=f32(2, 2, 9, 10), w=f32(5, 5, 3, 3),
                                           b=f32(5), y=f32(2, 5, 5, 4), relu=True, version="v3_igemm"),
    "conv3x3_concat_backward_data": lambda: dict(dy=f32(2, 5, 5, 4), w=f32(5, 5, 3, 3), dup=f32(2, 3, 7, 6),
                                                 dskip=f32(2, 2, 9, 10), version="v4_tf32_mma",
                                                 up_relu_mask=f32(2, 3, 7, 6),
                                                 skip_relu_mask=f32(2, 2, 9, 10)),
    "conv3x3_concat_backward_weight": lambda: dict(up=f32(2, 3, 7, 6), skip=f32(2, 2, 9, 10),
                                                   dy=f32(2, 5, 5, 4), dw=f32(5, 5, 3, 3), db=f32(5),
                                                   version="v5_bf16_mma"),
    "relu_backward": lambda: dict(y=f32(2, 3, 4), dy=f32(2, 3, 4), dx=f32(2, 3, 4)),
    "accumulate_": lambda: dict(dst=f32(7, 3), src=f32(7, 3)),
    "softmax_xent_forward": lambda: dict(logits=f32(2, 3, 4, 5), labels=i32(2, 4, 5),
                                         weights=f32(2, 4, 5), loss=f32(), probs=f32(2, 3, 4, 5)),
    "softmax_xent_backward": lambda: dict(probs=f32(2, 3, 4, 5), labels=i32(2, 4, 5),
                                          weights=f32(2, 4, 5), dlogits=f32(2, 3, 4, 5), dloss=1.0),
    "dropout_mask": lambda: dict(mask=u8(3, 4, 5), p=0.5, seed=123),
    "dropout_forward": lambda: dict(x=f32(3, 4, 5), mask=u8(3, 4, 5), y=f32(3, 4, 5), p=0.5),
    "dropout_backward": lambda: dict(dy=f32(3, 4, 5), mask=u8(3, 4, 5), dx=f32(3, 4, 5), p=0.5),
    "dropout_seeded_forward": lambda: dict(x=f32(3, 4, 5), y=f32(3, 4, 5), p=0.5, seed=123),
    "dropout_seeded_backward": lambda: dict(dy=f32(3, 4, 5), dx=f32(3, 4, 5), p=0.5, seed=123),
    "sgd_momentum_update_": lambda: dict(param=f32(4, 3, 3, 3), grad=f32(4, 3, 3, 3),
                                         velocity=f32(4, 3, 3, 3), lr=0.01, momentum=0.99,
                                         weight_decay=0.0005),
    "sgd_momentum_update_multi_": lambda: dict(params=[f32(4, 3, 3, 3), f32(4)],
                                               grads=[f32(4, 3, 3, 3), f32(4)],
                                               velocities=[f32(4, 3, 3, 3), f32(4)], lr=0.01,
                                               momentum=0.99, weight_decay=0.0005),
    "augment_warp": lambda: dict(image=f32(6, 6), labels=i32(6, 6), weights=f32(6, 6),
                                 coarse=f32(2, 3, 3), image_out=f32(6, 6), labels_out=i32(6, 6),
                                 weights_out=f32(6, 6), quarter_turns=1, flip_rows=True,
                                 flip_columns=False, gamma=1.1, contrast=0.9, brightness=0.05),
}

OUTPUTS = {
    "conv3x3_forward": ("y",), "conv3x3_backward_data": ("dx",),
    "conv3x3_backward_weight": ("dw", "db"), "conv1x1_forward": ("y",),
    "conv1x1_backward_data": ("dx",), "conv1x1_backward_weight": ("dw", "db"),
    "upconv2x2_forward": ("y",), "upconv2x2_backward_data": ("dx",),
    "upconv2x2_backward_weight": ("dw", "db"), "maxpool2x2_forward": ("y", "argmax"),
    "maxpool2x2_backward": ("dx",), "crop_concat_forward": ("y",),
    "crop_concat_backward": ("dup", "dskip"), "relu_backward": ("dx",), "accumulate_": ("dst",),
    "conv3x3_concat_forward": ("y",), "conv3x3_concat_backward_data": ("dup", "dskip"),
    "conv3x3_concat_backward_weight": ("dw", "db"),
    "softmax_xent_forward": ("loss", "probs"), "softmax_xent_backward": ("dlogits",),
    "dropout_mask": ("mask",), "dropout_forward": ("y",), "dropout_backward": ("dx",),
    "dropout_seeded_forward": ("y",), "dropout_seeded_backward": ("dx",),
    "sgd_momentum_update_": ("param", "velocity"),
    "augment_warp": ("image_out", "labels_out", "weights_out"),
}

# Ops whose arrays may have any number of dimensions (only their agreement is checked).
ANY_NDIM = {"relu_backward", "accumulate_", "dropout_mask", "dropout_forward", "dropout_backward",
            "dropout_seeded_forward", "dropout_seeded_backward", "sgd_momentum_update_"}

ARRAY_ARGS = [(op, name) for op, make in VALID.items() for name, value in make().items()
              if isinstance(value, FakeCudaArray)]


def call(op, **kwargs):
    return getattr(_C, op)(**kwargs, stream=0)


def raises_naming(exc_type, op, arg, *fragments, **kwargs):
    """Calls ``op`` with the valid arguments updated by ``kwargs``; asserts the error names the
    op, the argument and every fragment."""
    args = VALID[op]()
    args.update(kwargs)
    with pytest.raises(exc_type) as info:
        call(op, **args)
    message = str(info.value)
    assert f"{op}: argument {arg}" in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


# ------------------------------------------------------------------------------------------------
# The module itself
# ------------------------------------------------------------------------------------------------

def ops_md_names():
    text = (ROOT / "docs" / "OPS.md").read_text()
    return re.findall(r"^\| `(\w+)` \|", text, flags=re.MULTILINE)


def test_module_exposes_every_op_of_ops_md():
    names = ops_md_names()
    assert len(names) == 28, names
    missing = [n for n in names if not callable(getattr(_C, n, None))]
    assert not missing, f"unet_cuda._C lacks {missing}"
    assert set(VALID) == set(names)


def test_cuda_backend_defines_every_reference_op():
    # unet_cuda.ops.cuda needs CuPy to import, so it is read from the source: it exports the
    # reference's op list and defines a function for every name in it.
    source = (ROOT / "unet_cuda" / "ops" / "cuda.py").read_text()
    tree = ast.parse(source)
    assert any(isinstance(node, ast.ImportFrom) and node.module == "reference"
               and [a.name for a in node.names] == ["__all__"] for node in tree.body)
    from unet_cuda.ops import reference

    assert set(reference.__all__) == set(ops_md_names())
    defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    missing = set(reference.__all__) - defined
    assert not missing, f"unet_cuda/ops/cuda.py lacks {sorted(missing)}"


def test_helpers_work_without_a_device():
    assert isinstance(_C.device_count(), int) and _C.device_count() >= 0
    assert _C.cuda_version() >= 12000


def test_stream_is_keyword_only():
    with pytest.raises(TypeError):
        _C.accumulate_(f32(3), f32(3), 0)


# ------------------------------------------------------------------------------------------------
# conv3x3 kernel versions: the keyword `version` and the registry behind it
# ------------------------------------------------------------------------------------------------

CONV3X3_OPS = ("conv3x3_forward", "conv3x3_backward_data", "conv3x3_backward_weight")
CONV3X3_VERSIONS = ("v1_direct", "v2_smem", "v3_igemm", "v4_tf32_mma", "v5_bf16_mma", "v6_tf32_wgmma",
                    "v7_tf32_halo", "v8_bf16_halo", "v9_fp32_halo")


def module_constant(path, name):
    """The literal value of the module-level constant ``name`` in the Python file ``path``."""
    tree = ast.parse(path.read_text())
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if any(getattr(t, "id", None) == name for t in targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{path} defines no {name}")


def test_conv3x3_version_registry():
    assert _C.CONV3X3_VERSIONS == CONV3X3_VERSIONS
    assert _C.CONV3X3_DEFAULT_VERSION == "v1_direct"
    # The CUDA backend (it needs CuPy to import) keeps v1_direct as its default until a GPU run has
    # verified the others; its version list comes from the extension.
    default = module_constant(ROOT / "unet_cuda" / "ops" / "cuda.py", "DEFAULT_CONV3X3_VERSION")
    assert default == "v1_direct"


@pytest.mark.parametrize("op", CONV3X3_OPS)
@pytest.mark.parametrize("bad", ["v5_magic", "", "V1_DIRECT", "v1_direct ", "direct"])
def test_conv3x3_unknown_version_lists_the_valid_ones(op, bad):
    raises_naming(ValueError, op, "version", repr(bad), *(repr(v) for v in CONV3X3_VERSIONS),
                  version=bad)


@pytest.mark.parametrize("op", CONV3X3_OPS)
def test_conv3x3_version_must_be_a_string(op):
    with pytest.raises(TypeError):
        call(op, **VALID[op](), version=3)
    with pytest.raises(TypeError):
        call(op, **VALID[op](), version=None)


def test_conv3x3_version_is_checked_first():
    raises_naming(ValueError, "conv3x3_forward", "version", "'nope'", version="nope",
                  x=f32(2, 3, 7, 6).like(typestr="<f8"))


def test_conv3x3_backward_weight_splits():
    splits = _C.conv3x3_backward_weight_splits
    assert splits(1, 64, 570, 570, 64) == 1                      # the default, v1_direct: no split
    for version in CONV3X3_VERSIONS[1:]:
        # d1b's weight gradient (64 x 576 outputs over 322,624 pixels) splits its sum ...
        assert 8 < splits(1, 64, 570, 570, 64, version=version) <= 128, version
        # ... b2's (1024 x 9216 outputs) has tiles enough without.
        assert splits(1, 1024, 30, 30, 1024, version=version) == 1, version
        assert splits(0, 3, 5, 5, 2, version=version) == 1, version
        # A function of the shapes: the same answer every time.
        assert splits(2, 3, 40, 40, 5, version=version) == splits(2, 3, 40, 40, 5, version=version)
    with pytest.raises(ValueError, match="argument version must be one of"):
        splits(1, 1, 3, 3, 1, version="v0")
    with pytest.raises(ValueError, match="H, W >= 3"):
        splits(1, 1, 2, 3, 1, version="v2_smem")


def report_conv3x3_version_calls():
    """Runs each conv3x3 op once per version with valid host-backed fakes; prints the results."""
    results = {}
    for op in CONV3X3_OPS:
        for version in CONV3X3_VERSIONS:
            try:
                call(op, **VALID[op](), version=version)
            except Exception as exc:  # noqa: BLE001 - reported to the parent test
                results[f"{op} {version}"] = [type(exc).__name__, str(exc)]
            else:
                results[f"{op} {version}"] = ["no exception", ""]
    print(json.dumps(results))


def test_every_conv3x3_version_reaches_the_device_memory_check():
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            "import test_bindings; test_bindings.report_conv3x3_version_calls()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert proc.returncode == 0, f"the subprocess died (code {proc.returncode}): {proc.stderr}"
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == len(CONV3X3_OPS) * len(CONV3X3_VERSIONS)
    for name, (kind, message) in results.items():
        host_memory = kind == "ValueError" and "is host memory" in message  # a GPU machine
        no_device = kind == "RuntimeError" and "cannot check that argument" in message  # no driver
        assert host_memory or no_device, f"{name}: {kind}: {message}"
        assert message.startswith(f"{name.split()[0]}: "), message


# ------------------------------------------------------------------------------------------------
# Checks every array argument of every op gets
# ------------------------------------------------------------------------------------------------

WRONG_TYPESTR = {"<f4": "<f8", "<i4": "<i8", "|u1": "<f4"}


@pytest.mark.parametrize("op,arg", ARRAY_ARGS)
def test_wrong_dtype(op, arg):
    fake = VALID[op]()[arg]
    wrong = WRONG_TYPESTR[fake.typestr]
    raises_naming(ValueError, op, arg, "dtype", wrong, **{arg: fake.like(typestr=wrong)})


@pytest.mark.parametrize("op,arg", [(op, arg) for op, arg in ARRAY_ARGS if op not in ANY_NDIM])
def test_wrong_ndim(op, arg):
    fake = VALID[op]()[arg]
    raises_naming(ValueError, op, arg, "dimensions", **{arg: fake.like(shape=fake.shape + (1,))})
    if len(fake.shape) > 0:
        raises_naming(ValueError, op, arg, "dimensions", **{arg: fake.like(shape=fake.shape[1:])})


def non_contiguous_strides(shape, itemsize):
    """Byte strides of a view that takes every other element of the innermost extent > 1."""
    strides, step = [], itemsize
    for extent in reversed(shape):
        strides.append(step)
        step *= extent
    strides.reverse()
    k = max(i for i, extent in enumerate(shape) if extent > 1)
    strides[k] *= 2
    return tuple(strides)


@pytest.mark.parametrize("op,arg", [(op, arg) for op, arg in ARRAY_ARGS
                                    if any(e > 1 for e in VALID[op]()[arg].shape)])
def test_non_contiguous(op, arg):
    fake = VALID[op]()[arg]
    itemsize = 1 if fake.typestr == "|u1" else 4
    strides = non_contiguous_strides(fake.shape, itemsize)
    raises_naming(ValueError, op, arg, "C-contiguous", **{arg: fake.like(strides=strides)})


@pytest.mark.parametrize("op,arg", ARRAY_ARGS)
def test_null_pointer(op, arg):
    fake = VALID[op]()[arg]
    raises_naming(ValueError, op, arg, "null", **{arg: fake.like(ptr=0)})


# The optional arrays (None: not given): the backward-data ops' ReLU masks (MASK_ARGS).
OPTIONAL = {"relu_mask", "up_relu_mask", "skip_relu_mask"}


@pytest.mark.parametrize("op,arg", ARRAY_ARGS)
def test_not_a_cuda_array(op, arg):
    fake = VALID[op]()[arg]
    raises_naming(TypeError, op, arg, "__cuda_array_interface__", **{arg: [1.0, 2.0]})
    if arg not in OPTIONAL:
        raises_naming(TypeError, op, arg, "NoneType", **{arg: None})
    host = np.zeros(fake.shape, dtype=np.dtype(fake.typestr))
    raises_naming(ValueError, op, arg, "host memory", "numpy.ndarray", **{arg: host})


@pytest.mark.parametrize("op,arg", [(op, arg) for op, outs in OUTPUTS.items() for arg in outs])
def test_read_only_output(op, arg):
    fake = VALID[op]()[arg]
    raises_naming(ValueError, op, arg, "read-only", **{arg: fake.like(read_only=True)})


@pytest.mark.parametrize("op,arg", [(op, arg) for op, outs in OUTPUTS.items() for arg in outs
                                    if op != "dropout_mask"])  # its mask is its only array
def test_output_overlapping_another_argument(op, arg):
    args = VALID[op]()
    other = next(name for name, value in args.items()
                 if isinstance(value, FakeCudaArray) and name != arg)
    shared = args[other]
    # The output's first bytes are the other argument's memory.
    args[arg] = args[arg].like(ptr=shared.ptr)
    with pytest.raises(ValueError, match="overlaps"):
        call(op, **args)


@pytest.mark.parametrize("op,mask,out", [("conv3x3_backward_data", "relu_mask", "dx"),
                                         ("maxpool2x2_backward", "relu_mask", "dx"),
                                         ("conv3x3_concat_backward_data", "skip_relu_mask", "dskip"),
                                         ("conv3x3_concat_backward_data", "up_relu_mask", "dup")])
def test_relu_mask_must_not_overlap_an_output(op, mask, out):
    """A mask is read while the output is written: the same memory (in place) is refused."""
    args = VALID[op]()
    args[mask] = args[mask].like(ptr=args[out].ptr)
    with pytest.raises(ValueError, match="overlaps"):
        call(op, **args)


def test_malformed_interfaces():
    op = "accumulate_"
    raises_naming(ValueError, op, "src", "masked", src=f32(7, 3).like(mask=object()))
    raises_naming(ValueError, op, "src", "strides", src=f32(7, 3).like(strides=(4,)))

    class NoShape:
        __cuda_array_interface__ = {"typestr": "<f4", "data": (8, False), "version": 3}

    raises_naming(ValueError, op, "src", "shape", src=NoShape())

    class NotADict:
        __cuda_array_interface__ = ("<f4", (7, 3))

    raises_naming(ValueError, op, "src", "dict", src=NotADict())
    raises_naming(ValueError, op, "src", "integer", src=f32(7, 3).like(shape=(7.0, 3)))


# ------------------------------------------------------------------------------------------------
# Shapes and sizes each op requires
# ------------------------------------------------------------------------------------------------

SHAPE_CASES = [
    # (op, argument blamed, replaced arguments)
    ("conv3x3_forward", "w", dict(w=f32(5, 2, 3, 3))),              # C differs from x's
    ("conv3x3_forward", "w", dict(w=f32(5, 3, 2, 2))),              # not 3x3
    ("conv3x3_forward", "b", dict(b=f32(4))),
    ("conv3x3_forward", "y", dict(y=f32(2, 5, 6, 4))),
    ("conv3x3_forward", "y", dict(y=f32(1, 5, 5, 4))),
    ("conv3x3_forward", "x", dict(x=f32(2, 3, 2, 6), y=f32(2, 5, 0, 4))),  # H < 3
    ("conv3x3_forward", "x", dict(x=f32(2, 3, 6, 1), y=f32(2, 5, 4, 0))),  # W < 3
    ("conv3x3_backward_data", "dy", dict(dy=f32(2, 5, 4, 4))),
    ("conv3x3_backward_data", "w", dict(w=f32(5, 2, 3, 3))),
    ("conv3x3_backward_data", "dy", dict(dy=f32(2, 4, 5, 4))),      # O differs from w's
    ("conv3x3_backward_weight", "dy", dict(dy=f32(1, 5, 5, 4))),    # batch differs from x's
    ("conv3x3_backward_weight", "dy", dict(dy=f32(2, 5, 5, 5))),
    ("conv3x3_backward_weight", "dw", dict(dw=f32(5, 3, 3, 2))),
    ("conv3x3_backward_weight", "db", dict(db=f32(4))),
    ("conv1x1_forward", "w", dict(w=f32(2, 3, 3, 3))),
    ("conv1x1_forward", "y", dict(y=f32(2, 2, 5, 5))),
    ("conv1x1_forward", "b", dict(b=f32(3))),
    ("conv1x1_backward_data", "w", dict(dx=f32(2, 4, 5, 4))),       # C of dx differs from w's
    ("conv1x1_backward_data", "dy", dict(dy=f32(2, 2, 4, 4))),
    ("conv1x1_backward_weight", "dy", dict(dy=f32(2, 2, 5, 3))),
    ("conv1x1_backward_weight", "db", dict(db=f32(3))),
    ("upconv2x2_forward", "w", dict(w=f32(4, 3, 3, 3))),
    ("upconv2x2_forward", "y", dict(y=f32(2, 4, 6, 5))),
    ("upconv2x2_backward_data", "dy", dict(dy=f32(2, 4, 5, 4))),    # odd: not 2H
    ("upconv2x2_backward_data", "w", dict(w=f32(4, 2, 2, 2))),
    ("upconv2x2_backward_weight", "dy", dict(dy=f32(2, 4, 6, 6))),
    ("upconv2x2_backward_weight", "dw", dict(dw=f32(4, 3, 1, 1))),
    ("maxpool2x2_forward", "x", dict(x=f32(2, 3, 5, 4))),           # odd H
    ("maxpool2x2_forward", "x", dict(x=f32(2, 3, 6, 3))),           # odd W
    ("maxpool2x2_forward", "x", dict(x=f32(2, 3, 0, 4), y=f32(2, 3, 0, 2), argmax=u8(2, 3, 0, 2))),
    ("maxpool2x2_forward", "y", dict(y=f32(2, 3, 3, 3))),
    ("maxpool2x2_forward", "argmax", dict(argmax=u8(2, 3, 2, 2))),
    ("maxpool2x2_backward", "argmax", dict(argmax=u8(2, 3, 3, 3))),
    ("maxpool2x2_backward", "dx", dict(dx=f32(2, 3, 5, 4))),
    ("maxpool2x2_backward", "relu_mask", dict(relu_mask=f32(2, 3, 6, 4))),   # dx's shape, not dy's
    ("conv3x3_backward_data", "relu_mask", dict(relu_mask=f32(2, 5, 5, 4))),  # dy's shape, not dx's
    ("conv1x1_backward_data", "relu_mask", dict(relu_mask=f32(2, 3, 5, 5))),
    ("upconv2x2_backward_data", "relu_mask", dict(relu_mask=f32(2, 3, 2, 3))),
    ("conv3x3_concat_backward_data", "up_relu_mask", dict(up_relu_mask=f32(2, 5, 7, 6))),
    ("conv3x3_concat_backward_data", "skip_relu_mask", dict(skip_relu_mask=f32(2, 2, 7, 6))),
    ("crop_concat_forward", "skip", dict(skip=f32(2, 2, 7, 7))),    # odd Hs - H
    ("crop_concat_forward", "skip", dict(skip=f32(2, 2, 8, 8))),    # odd Ws - W
    ("crop_concat_forward", "skip", dict(skip=f32(2, 2, 2, 7))),    # Hs < H
    ("crop_concat_forward", "skip", dict(skip=f32(1, 2, 8, 7))),    # batch
    ("crop_concat_forward", "y", dict(y=f32(2, 4, 4, 5))),
    ("crop_concat_backward", "dskip", dict(dskip=f32(2, 2, 7, 8))),
    ("crop_concat_backward", "dskip", dict(dskip=f32(2, 2, 2, 3))),
    ("crop_concat_backward", "dskip", dict(dskip=f32(2, 6, 8, 7))),  # more channels than dy
    ("crop_concat_backward", "dskip", dict(dskip=f32(3, 2, 8, 7))),
    ("crop_concat_backward", "dup", dict(dup=f32(2, 2, 4, 5))),
    ("relu_backward", "dy", dict(dy=f32(2, 3, 5))),
    ("relu_backward", "dx", dict(dx=f32(3, 2, 4))),
    ("relu_backward", "dy", dict(dy=f32(2, 3, 4, 1))),
    ("accumulate_", "src", dict(src=f32(3, 7))),
    ("softmax_xent_forward", "labels", dict(labels=i32(2, 4, 4))),
    ("softmax_xent_forward", "weights", dict(weights=f32(1, 4, 5))),
    ("softmax_xent_forward", "probs", dict(probs=f32(2, 2, 4, 5))),
    ("softmax_xent_forward", "loss", dict(loss=f32(1))),
    ("softmax_xent_forward", "logits", dict(logits=f32(2, 0, 4, 5), probs=f32(2, 0, 4, 5))),
    ("softmax_xent_forward", "logits", dict(logits=f32(0, 3, 4, 5), probs=f32(0, 3, 4, 5),
                                            labels=i32(0, 4, 5), weights=f32(0, 4, 5))),
    ("softmax_xent_backward", "labels", dict(labels=i32(2, 5, 4))),
    ("softmax_xent_backward", "dlogits", dict(dlogits=f32(2, 3, 4, 4))),
    ("dropout_forward", "mask", dict(mask=u8(3, 4, 4))),
    ("dropout_forward", "y", dict(y=f32(3, 4, 4))),
    ("dropout_backward", "mask", dict(mask=u8(60))),
    ("dropout_backward", "dx", dict(dx=f32(3, 5, 4))),
    ("sgd_momentum_update_", "grad", dict(grad=f32(4, 3, 3, 2))),
    ("sgd_momentum_update_", "velocity", dict(velocity=f32(4, 3, 3))),
    ("augment_warp", "labels", dict(labels=i32(6, 5))),
    ("augment_warp", "weights", dict(weights=f32(5, 6))),
    ("augment_warp", "coarse", dict(coarse=f32(3, 3, 3))),           # not (dy, dx)
    ("augment_warp", "coarse", dict(coarse=f32(2, 0, 3))),           # no nodes
    ("augment_warp", "image_out", dict(image_out=f32(6, 5))),
    ("augment_warp", "labels_out", dict(labels_out=i32(5, 6))),
    ("augment_warp", "weights_out", dict(weights_out=f32(6, 7))),
    ("augment_warp", "image", dict(image=f32(0, 6), labels=i32(0, 6), weights=f32(0, 6),
                                   image_out=f32(0, 6), labels_out=i32(0, 6), weights_out=f32(0, 6))),
]


@pytest.mark.parametrize("op,arg,changes", SHAPE_CASES,
                         ids=[f"{op}-{arg}-{i}" for i, (op, arg, _) in enumerate(SHAPE_CASES)])
def test_inconsistent_shapes(op, arg, changes):
    message = raises_naming(ValueError, op, arg, **changes)
    # The message shows the shapes: at least the blamed argument's.
    shape = changes.get(arg, VALID[op]()[arg]).shape
    assert str(shape).replace(" ", "") in message.replace(" ", ""), message


SCALAR_CASES = [
    ("dropout_mask", "p", 1.0), ("dropout_mask", "p", -0.25), ("dropout_mask", "p", math.nan),
    ("dropout_mask", "p", math.inf),
    ("dropout_mask", "seed", -1), ("dropout_mask", "seed", 2**64), ("dropout_mask", "seed", 1.5),
    ("dropout_mask", "seed", "7"), ("dropout_mask", "seed", True),
    ("dropout_forward", "p", 1.0), ("dropout_forward", "p", math.nan),
    ("dropout_backward", "p", -1e-9),
    ("dropout_seeded_forward", "p", 1.0), ("dropout_seeded_forward", "seed", -1),
    ("dropout_seeded_forward", "seed", 2**64), ("dropout_seeded_backward", "p", math.nan),
    ("dropout_seeded_backward", "seed", 1.5), ("dropout_seeded_backward", "seed", True),
    ("softmax_xent_backward", "dloss", math.nan), ("softmax_xent_backward", "dloss", -math.inf),
    ("sgd_momentum_update_", "lr", math.nan), ("sgd_momentum_update_", "lr", -0.1),
    ("sgd_momentum_update_", "lr", math.inf),
    ("sgd_momentum_update_", "momentum", 1.5), ("sgd_momentum_update_", "momentum", -0.5),
    ("sgd_momentum_update_", "momentum", math.nan),
    ("sgd_momentum_update_", "weight_decay", -1e-4), ("sgd_momentum_update_", "weight_decay", math.inf),
    ("augment_warp", "quarter_turns", 4), ("augment_warp", "quarter_turns", -1),
    ("augment_warp", "quarter_turns", 2**70), ("augment_warp", "quarter_turns", 1.0),
    ("augment_warp", "quarter_turns", True), ("augment_warp", "quarter_turns", "1"),
    ("augment_warp", "gamma", 0.0), ("augment_warp", "gamma", -1.0), ("augment_warp", "gamma", math.nan),
    ("augment_warp", "gamma", math.inf), ("augment_warp", "contrast", math.nan),
    ("augment_warp", "contrast", -math.inf), ("augment_warp", "brightness", math.inf),
    ("augment_warp", "brightness", math.nan),
]


@pytest.mark.parametrize("op,arg,value", SCALAR_CASES)
def test_bad_scalars(op, arg, value):
    raises_naming(ValueError, op, arg, "must be", **{arg: value})


def test_augment_warp_odd_turns_need_a_square_window():
    rect = dict(image=f32(6, 5), labels=i32(6, 5), weights=f32(6, 5), image_out=f32(6, 5),
                labels_out=i32(6, 5), weights_out=f32(6, 5))
    for turns in (1, 3):
        raises_naming(ValueError, "augment_warp", "quarter_turns", "square window", "(6, 5)",
                      quarter_turns=turns, **rect)


# ------------------------------------------------------------------------------------------------
# Calls that pass every check meet the device-memory check: in a subprocess, to be safe
# ------------------------------------------------------------------------------------------------

def print_call_results(cases: dict) -> None:
    """Calls the op named first in each case name; prints {name: [exception type, message]}."""
    results = {}
    for name, args in cases.items():
        try:
            call(name.split()[0], **args)
        except Exception as exc:  # noqa: BLE001 - reported to the parent test
            results[name] = [type(exc).__name__, str(exc)]
        else:
            results[name] = ["no exception", ""]
    print(json.dumps(results))


def call_results_in_a_subprocess(reporter: str) -> dict:
    """Runs ``test_bindings.<reporter>()`` in a fresh interpreter (a wrong check could crash it)."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"import test_bindings; test_bindings.{reporter}()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert proc.returncode == 0, f"the subprocess died (code {proc.returncode}): {proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_each_met_the_device_memory_check(results: dict) -> None:
    for name, (kind, message) in results.items():
        op = name.split()[0]
        host_memory = kind == "ValueError" and "is host memory" in message  # a GPU machine
        no_device = kind == "RuntimeError" and "cannot check that argument" in message  # no driver
        assert host_memory or no_device, f"{name}: {kind}: {message}"
        assert message.startswith(f"{op}: "), message

def report_valid_calls():
    """Runs each op once with valid host-backed fakes; prints {op: [exception type, message]}."""
    cases = {op: make() for op, make in VALID.items()}
    # Seeds at the ends of the range, and an integer-like seed, pass the scalar checks too.
    cases["dropout_mask max seed"] = dict(VALID["dropout_mask"](), seed=2**64 - 1)
    cases["dropout_mask numpy seed"] = dict(VALID["dropout_mask"](), seed=np.uint64(5))
    cases["sgd_momentum_update_ 1-d"] = dict(param=f32(5), grad=f32(5), velocity=f32(5), lr=0.0,
                                             momentum=1.0, weight_decay=0.0)
    # A non-square window with an even number of turns, a numpy integer, one pixel and one node.
    cases["augment_warp non-square"] = dict(
        VALID["augment_warp"](), image=f32(7, 4), labels=i32(7, 4), weights=f32(7, 4),
        image_out=f32(7, 4), labels_out=i32(7, 4), weights_out=f32(7, 4), quarter_turns=np.int64(2))
    cases["augment_warp 1x1"] = dict(
        image=f32(1, 1), labels=i32(1, 1), weights=f32(1, 1), coarse=f32(2, 1, 1), image_out=f32(1, 1),
        labels_out=i32(1, 1), weights_out=f32(1, 1), quarter_turns=3, flip_rows=False,
        flip_columns=True, gamma=1.0, contrast=-2.0, brightness=0.0)
    # The optional ReLU masks left out (None), as most calls leave them.
    for op, masks in MASK_ARGS.items():
        cases[f"{op} no relu_mask"] = dict(VALID[op](), **{name: None for name in masks})
    cases["maxpool2x2_backward accumulate"] = dict(VALID["maxpool2x2_backward"](), accumulate=True)
    print_call_results(cases)


def test_sgd_multi_checks_its_sequences():
    """sgd_momentum_update_multi_: three sequences of as many arrays, each array checked as
    sgd_momentum_update_ checks it and named by its index; no output overlapping another argument."""
    op = "sgd_momentum_update_multi_"
    raises_naming(TypeError, op, "params", "must be a sequence of CUDA arrays", params=f32(4))
    raises_naming(TypeError, op, "grads", "must be a sequence of CUDA arrays", grads="grads")
    raises_naming(ValueError, op, "grads", "as many arrays as params (2), got 1", grads=[f32(4, 3, 3, 3)])
    raises_naming(ValueError, op, "velocities", "as many arrays as params (2), got 3",
                  velocities=[f32(4, 3, 3, 3), f32(4), f32(4)])
    raises_naming(ValueError, op, "grads[1]", "(3,)", grads=[f32(4, 3, 3, 3), f32(3)])
    raises_naming(ValueError, op, "velocities[0]", velocities=[f32(4, 3, 3), f32(4)])
    raises_naming(ValueError, op, "params[1]", "float32", params=[f32(4, 3, 3, 3), i32(4)],
                  grads=[f32(4, 3, 3, 3), i32(4)], velocities=[f32(4, 3, 3, 3), i32(4)])
    raises_naming(ValueError, op, "params[1]", "is host memory",
                  params=[f32(4, 3, 3, 3), np.zeros(4, np.float32)])
    raises_naming(ValueError, op, "lr", "finite and >= 0", lr=-0.5)
    raises_naming(ValueError, op, "momentum", "in [0, 1]", momentum=1.5)
    params = [f32(4, 3, 3, 3), f32(4)]
    shared = params[0].like(ptr=params[0].ptr)  # velocities[1]'s memory is params[0]'s
    raises_naming(ValueError, op, "velocities[1]", "overlaps argument params[0]", params=params,
                  velocities=[f32(4, 3, 3, 3), shared.like(shape=(4,), ptr=params[0].ptr)])


# The ops with optional ReLU masks, and their names.
MASK_ARGS = {"conv3x3_backward_data": ("relu_mask",), "conv1x1_backward_data": ("relu_mask",),
             "upconv2x2_backward_data": ("relu_mask",), "maxpool2x2_backward": ("relu_mask",),
             "conv3x3_concat_backward_data": ("up_relu_mask", "skip_relu_mask")}


def test_valid_calls_reach_the_device_memory_check():
    results = call_results_in_a_subprocess("report_valid_calls")
    assert len(results) == len(VALID) + 6 + len(MASK_ARGS)
    assert_each_met_the_device_memory_check(results)


# ------------------------------------------------------------------------------------------------
# Scalars as 0-d CUDA arrays (read by the kernel when it runs, for CUDA graphs): the dropout ops'
# seed (uint64) and sgd_momentum_update_'s lr (float32)
# ------------------------------------------------------------------------------------------------

def u64(*shape):
    return FakeCudaArray(shape, "<u8")


DEVICE_SCALARS = [("dropout_mask", "seed", u64), ("dropout_seeded_forward", "seed", u64),
                  ("dropout_seeded_backward", "seed", u64), ("sgd_momentum_update_", "lr", f32)]


@pytest.mark.parametrize("op,arg,make", DEVICE_SCALARS)
def test_device_scalar_wrong_dtype(op, arg, make):
    wanted = "uint64" if arg == "seed" else "float32"
    for wrong in ("<i8", "<f8", "<f4" if arg == "seed" else "<u8", "|u1"):
        raises_naming(ValueError, op, arg, "dtype", wanted, wrong, **{arg: make().like(typestr=wrong)})


@pytest.mark.parametrize("op,arg,make", DEVICE_SCALARS)
def test_device_scalar_must_be_0d(op, arg, make):
    for shape in [(1,), (2, 3), (0,)]:
        raises_naming(ValueError, op, arg, "0 dimensions", str(shape), **{arg: make(*shape)})


@pytest.mark.parametrize("op,arg,make", DEVICE_SCALARS)
def test_device_scalar_null_pointer(op, arg, make):
    raises_naming(ValueError, op, arg, "null", **{arg: make().like(ptr=0)})


@pytest.mark.parametrize("op,arg,make", DEVICE_SCALARS)
def test_device_scalar_overlapping_an_output(op, arg, make):
    args = VALID[op]()
    output = OUTPUTS[op][0]
    args[arg] = make().like(ptr=args[output].ptr)  # the scalar lies inside the output
    with pytest.raises(ValueError, match="overlaps"):
        call(op, **args)


@pytest.mark.parametrize("op,arg,make", DEVICE_SCALARS)
def test_device_scalar_malformed_interface(op, arg, make):
    # Checked like any array argument. (A host pointer behind a valid interface meets the
    # device-memory check: test_valid_device_scalars_reach_the_device_memory_check.)
    raises_naming(ValueError, op, arg, "masked", **{arg: make().like(mask=object())})


def test_lr_that_is_no_number_is_a_type_error():
    args = VALID["sgd_momentum_update_"]()
    for bad in ("0.1", None, [0.1]):
        with pytest.raises(TypeError, match="sgd_momentum_update_: argument lr must be a number or a 0-d "
                                            "float32 CUDA array"):
            call("sgd_momentum_update_", **dict(args, lr=bad))


def test_seed_that_is_no_integer_names_both_forms():
    raises_naming(ValueError, "dropout_mask", "seed", "0-d uint64 CUDA array", seed=2.5)


def report_device_scalar_calls():
    """Runs the ops with valid 0-d fakes (host memory behind them); prints the results."""
    cases = {
        "dropout_mask": dict(VALID["dropout_mask"](), seed=u64()),
        "dropout_mask empty mask": dict(mask=u8(0, 4), p=0.5, seed=u64()),
        "dropout_seeded_forward": dict(VALID["dropout_seeded_forward"](), seed=u64()),
        "dropout_seeded_backward": dict(VALID["dropout_seeded_backward"](), seed=u64()),
        "sgd_momentum_update_": dict(VALID["sgd_momentum_update_"](), lr=f32()),
    }
    print_call_results(cases)


def test_valid_device_scalars_reach_the_device_memory_check():
    results = call_results_in_a_subprocess("report_device_scalar_calls")
    assert len(results) == 5
    assert_each_met_the_device_memory_check(results)


# ------------------------------------------------------------------------------------------------
# The convolution of a concatenated input [up, centre crop of skip]
# ------------------------------------------------------------------------------------------------

CONCAT_OPS = ("conv3x3_concat_forward", "conv3x3_concat_backward_data", "conv3x3_concat_backward_weight")


def test_concat_versions_are_the_gemm_versions():
    assert _C.CONV3X3_CONCAT_VERSIONS == ("v3_igemm", "v4_tf32_mma", "v5_bf16_mma", "v6_tf32_wgmma",
                                          "v7_tf32_halo", "v8_bf16_halo", "v9_fp32_halo")


@pytest.mark.parametrize("op", CONCAT_OPS)
@pytest.mark.parametrize("version", ["v1_direct", "v2_smem"])
def test_concat_refuses_versions_that_cannot_read_two_inputs(op, version):
    raises_naming(ValueError, op, "version", repr(version), "cannot read a concatenated input",
                  "'v3_igemm'", version=version)


@pytest.mark.parametrize("op", CONCAT_OPS)
def test_concat_unknown_version_lists_the_valid_ones(op):
    raises_naming(ValueError, op, "version", "'v99_missing'", *(repr(v) for v in CONV3X3_VERSIONS), version="v99_missing")


def test_concat_skip_must_crop_evenly():
    raises_naming(ValueError, "conv3x3_concat_forward", "skip", "cannot be centre-cropped to 7 x 6",
                  "Hs-H = 1", skip=f32(2, 2, 8, 10))
    raises_naming(ValueError, "conv3x3_concat_forward", "skip", "Ws-W = -2", skip=f32(2, 2, 9, 4))
    raises_naming(ValueError, "conv3x3_concat_backward_data", "dskip", "cannot be centre-cropped",
                  dskip=f32(2, 2, 9, 9))


def test_concat_shapes_must_agree():
    raises_naming(ValueError, "conv3x3_concat_forward", "skip", "batch size N = 2", skip=f32(3, 2, 9, 10))
    raises_naming(ValueError, "conv3x3_concat_forward", "w", "(O, Cu+Cs, 3, 3)", w=f32(5, 4, 3, 3))
    raises_naming(ValueError, "conv3x3_concat_forward", "y", "(N, O, H-2, W-2)", y=f32(2, 5, 7, 6))
    raises_naming(ValueError, "conv3x3_concat_forward", "b", "(O,) from w", b=f32(4))
    raises_naming(ValueError, "conv3x3_concat_backward_data", "w", "(O, Cu+Cs, 3, 3)", w=f32(5, 6, 3, 3))
    raises_naming(ValueError, "conv3x3_concat_backward_weight", "dw", "(O, Cu+Cs, 3, 3)",
                  dw=f32(5, 3, 3, 3))
    raises_naming(ValueError, "conv3x3_concat_backward_weight", "up", "needs H and W >= 3",
                  up=f32(2, 3, 2, 6), dy=f32(2, 5, 0, 4))


def test_version_availability():
    """Every version but v6-v8 runs on any GPU of the build (no CUDA call is needed to say so);
    v6-v8 ask the device, which here may have no driver at all (then the error names v6, whose
    probe answers for all three)."""
    for version in CONV3X3_VERSIONS[:5] + ("v9_fp32_halo",):
        assert _C.conv3x3_version_available(version) is True
    for version in ("v6_tf32_wgmma", "v7_tf32_halo", "v8_bf16_halo"):
        try:
            assert _C.conv3x3_version_available(version) in (True, False)
        except RuntimeError as exc:
            assert "v6_tf32_wgmma" in str(exc)
    with pytest.raises(ValueError, match="conv3x3_version_available: argument version must be one of"):
        _C.conv3x3_version_available("v99_missing")


def test_conv3x3_tap_major_choice():
    assert _C.conv3x3_tap_major("v6_tf32_wgmma", 64) is True
    assert _C.conv3x3_tap_major("v4_tf32_mma", 1024) is True
    assert _C.conv3x3_tap_major("v5_bf16_mma", 48) is False
    assert _C.conv3x3_tap_major("v3_igemm", 64) is False
    assert _C.conv3x3_tap_major("v7_tf32_halo", 64) is False  # its own kernel: no tap-major GEMM
    assert _C.conv3x3_tap_major("v8_bf16_halo", 64) is False
    assert _C.conv3x3_tap_major("v9_fp32_halo", 64) is False
    with pytest.raises(ValueError, match="conv3x3_tap_major: argument version must be one of"):
        _C.conv3x3_tap_major("v99_missing", 64)
