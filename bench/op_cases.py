"""The per-op benchmark cases: every op of a training step at every layer of the 572 tile, with
its inputs, the call into our backend, and the same work through PyTorch (the peer).

A case knows its shapes and its work (FLOPs for the convolutions, bytes moved for the rest);
:func:`make_inputs` draws fresh random inputs with the array module it is given (CuPy on the GPU,
NumPy in the CPU tests), :func:`ours` returns a zero-argument call of ``unet_cuda.ops`` on them and
:func:`peer` the same work in PyTorch on the same memory (shared through DLPack, no copy).

Peers, chosen as what a PyTorch user would run for the same result:

* convolutions: ``torch.nn.functional.conv2d`` / ``conv_transpose2d`` (+ in-place ReLU where our
  forward fuses it) and ``torch.ops.aten.convolution_backward`` with the output mask of the gradient
  asked for — cuDNN underneath. Our up-convolution weight is OIHW ``[Cout, Cin, 2, 2]``; PyTorch's
  transposed convolution wants ``[Cin, Cout, 2, 2]``: the peer gets ours transposed once, up front.
  A convolution's peer runs in three settings (``PEER_PRECISIONS``): true FP32 and TF32 on the same
  float32 tensors (the caller sets ``allow_tf32``), and bf16 on bf16 copies of the operands in
  channels_last, made once before timing (what bf16 autocast with channels_last runs);
* the decoder's first convolution of a level, ours ``conv3x3_concat_*`` (the concatenation
  ``[up, centre crop of skip]`` is never stored): forward ``cat`` + ``conv2d`` + ``relu_``; data
  gradient ``convolution_backward`` then the split of the concatenation's gradient (what autograd
  runs after it: the ``up`` part, and a zero skip gradient with the crop window written); weight
  gradient ``convolution_backward`` on the concatenation, made once up front (PyTorch keeps it from
  the forward pass);
* max-pool: ``max_pool2d_with_indices`` and its backward (int64 indices where ours are uint8);
* crop + concat: ``torch.cat`` of the up map and a slice of the skip; backward: a contiguous copy of
  the up part, a zero skip gradient with the crop window written (our op's outputs);
* loss: ``cross_entropy(reduction="none")`` times the weights, summed and divided by the pixel
  count, plus ``softmax`` for the probabilities ours also returns; backward: the closed form
  ``w (p - onehot) / (N H W)`` in three eager ops (labels as int64, converted up front);
* element-wise: ``threshold_backward`` (ReLU; where our backward-data ops fuse it, their peer is
  the convolution's gradient alone, and the ReLU's own case is left out of the step's sums), ``native_dropout`` (PyTorch's dropout: the mask
  drawn, applied and stored) and ``native_dropout_backward`` (mask times scale), ``bernoulli_``
  (mask), ``add_`` (accumulation) and the Caffe
  momentum rule over all parameters with ``torch._foreach_*`` (multi-tensor launches);
* augmentation (the window of one tile, its input plus a 32 px margin on each side): the field by
  ``interpolate(mode="bicubic", align_corners=True)`` of the 3x3 nodes, three ``grid_sample`` calls
  (bicubic image, nearest labels, bilinear weights; reflection padding), flips, ``rot90`` and the
  gray values in eager ops. PyTorch's cubic has a = -0.75 where ours has Keys' a = -0.5: the same
  work, not the same numbers.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from benchlib import Network, shape_str
from unet_cuda import functional as F

LR, MOMENTUM, WEIGHT_DECAY = 1e-3, 0.99, 0.0
DROPOUT_P = 0.5
AUGMENT_MARGIN = 32          # px on each side of the input tile (TrainingTileSampler's default)
# quarter_turns, flip_rows, flip_columns, gamma, contrast, brightness of the timed augmentation
AUGMENT_ARGS = (1, True, False, 1.1, 0.9, 0.05)
F32, I32, U8 = 4, 4, 1   # bytes per element
# The settings a convolution's peer runs in: cuDNN in true FP32, in TF32 (PyTorch's default for
# cuDNN) and in bf16 (bf16 tensors, channels_last). Memory-bound ops have an FP32 peer only.
PEER_PRECISIONS = ("fp32", "tf32", "bf16")


@dataclass(frozen=True)
class OpCase:
    op: str                      # the name in unet_cuda.ops
    layer: str                   # the layer of PERFORMANCE.md's table it runs at (or "all")
    dims: dict                   # named sizes the builders use
    shape: str                   # human-readable shapes, in -> out
    flops: float | None = None   # compute-bound ops
    nbytes: float | None = None  # memory-bound ops: minimum bytes read + written
    compute_bound: bool = False  # the peer runs in every setting of PEER_PRECISIONS, else fp32 only
    param_shapes: tuple = field(default=())   # sgd over all parameters
    version: str | None = None   # conv3x3 kernel version timed (None: the backend's setting, or no conv3x3)
    # False for an op a training step no longer runs in the precision modes: crop + concat, which
    # the decoder's fused convolution (conv3x3_concat_*, every GEMM version) makes unnecessary
    in_step: bool = True
    # True for an op our step fuses into another (the ReLU's backward, the skip maps' sums) but a
    # PyTorch step runs on its own: its peer time still counts in the peer's sum of a step
    peer_in_step: bool = False

    @property
    def id(self) -> str:
        return f"{self.op}-{self.layer}" + (f"-{self.version}" if self.version else "")

    @property
    def seed(self) -> int:
        """The same for every version of an op at a layer: all versions and the peer see one input."""
        return zlib.crc32(f"{self.op}-{self.layer}".encode())


def _concat_of(layer, net: Network):
    """The concatenation a decoder layer's first convolution reads (u<k>a <- cat<k>), else None."""
    if layer.kind != "conv3x3" or not (layer.name.startswith("u") and layer.name.endswith("a")):
        return None
    return next((cat for cat in net.concats if cat.name == f"cat{layer.name[1:-1]}"), None)


def _masked_input(layer, net: Network) -> bool:
    """Whether a training step fuses the ReLU's backward of this layer's input into the layer's
    backward-data op (its ``relu_mask``; unet_cuda/functional.py): the input is a ReLU's output
    that no dropout follows. The second convolution of a level reads the first's output, an
    up-convolution or the 1x1 convolution the output of the level's second (the layer before, at
    the same size); a level's first convolution reads a pool's output (a smaller size), or in the
    decoder the concatenation (_masked_skip)."""
    if layer.first or _concat_of(layer, net) is not None:
        return False
    prev = net.layers[[other.name for other in net.layers].index(layer.name) - 1]
    return (prev.kind == "conv3x3" and prev.out_hw == layer.in_hw
            and prev.name not in net.dropout_layers)


def _skip_layer(net: Network, level: int) -> str:
    """The layer whose output level ``level`` (0: the top) keeps for the skip connection."""
    return f"d{level + 1}b"


def _masked_skip(cat, net: Network) -> bool:
    """Whether the decoder's concatenated convolution at ``cat`` masks the skip map's gradient by
    the skip map (a ReLU's output, unless dropout follows it); ``up`` is never a ReLU's output."""
    level = net.depth - 1 - int(cat.name[len("cat"):])
    return _skip_layer(net, level) not in net.dropout_layers


def _conv_cases(layer, net: Network, relu_fused: bool) -> list[OpCase]:
    n, c, o = layer.batch, layer.cin, layer.cout
    h = layer.in_hw
    p = layer.out_hw
    k = {"conv3x3": 3, "upconv2x2": 2, "conv1x1": 1}[layer.kind]
    dims = dict(n=n, c=c, o=o, h=h, p=p, k=k)
    x, w, y = (n, c, h, h), (o, c, k, k), (n, o, p, p)
    family = layer.kind
    x_str = shape_str('x', x)
    cat = _concat_of(layer, net)
    if cat is not None:
        # the decoder's first convolution of a level reads [up, centre crop of skip] in place
        family = "conv3x3_concat"
        dims.update(cu=cat.up_channels, cs=cat.skip_channels, hs=cat.skip_hw)
        x_str = (f"{shape_str('up', (n, cat.up_channels, h, h))} "
                 f"{shape_str('skip', (n, cat.skip_channels, cat.skip_hw, cat.skip_hw))}")
    fwd_shape = f"{x_str} {shape_str('w', w)} -> {shape_str('y', y)}"
    cases = [OpCase(f"{family}_forward", layer.name, dims, fwd_shape, flops=layer.flops,
                    compute_bound=True)]
    if layer.kind == "conv3x3":
        # with the ReLU's backward fused, a separate pass only where a consumer of the output does
        # not take it (dropout follows)
        cases.append(OpCase("relu_backward", layer.name, dims,
                            f"{shape_str('y', y)} {shape_str('dy', y)} -> {shape_str('dx', y)}",
                            nbytes=3.0 * F32 * n * o * p * p,
                            in_step=not relu_fused or layer.name in net.dropout_layers, peer_in_step=True))
    if not layer.first:
        dx_str = shape_str('dx', x) if cat is None else x_str.replace("up[", "dup[").replace("skip[", "dskip[")
        if cat is not None:
            masks = dict(skip_relu_mask=relu_fused and _masked_skip(cat, net))
        else:
            masks = dict(relu_mask=relu_fused and _masked_input(layer, net))
        masked = any(masks.values())
        cases.append(OpCase(f"{family}_backward_data", layer.name, dict(dims, **masks),
                            f"{shape_str('dy', y)} {shape_str('w', w)} -> {dx_str}"
                            + (" (ReLU-masked)" if masked else ""),
                            flops=layer.flops, compute_bound=True))
    cases.append(OpCase(f"{family}_backward_weight", layer.name, dims,
                        f"{x_str} {shape_str('dy', y)} -> {shape_str('dw', w)} db[{o}]",
                        flops=layer.flops, compute_bound=True))
    return cases


# The 3x3 convolution's kernel versions side by side (csrc/conv3x3.cu, docs/CONV3X3.md): every
# version at these four layers, which span the shapes of the network (568² x 64 channels, 136² x
# 256, 64² x 512, 28² x 1024); with_conv3x3_versions() gives the cases of every layer once per version
# asked for (the precision modes' versions, in bench/test_bench_kernels.py).
CONV3X3_VERSION_LAYERS = ("d1b", "d3b", "d4b", "b2")
CONV3X3_VERSIONS = ("v1_direct", "v2_smem", "v3_igemm", "v4_tf32_mma", "v5_bf16_mma", "v6_tf32_wgmma",
                    "v7_tf32_halo", "v8_bf16_halo", "v9_fp32_halo")


def conv3x3_version_cases(net: Network, versions=CONV3X3_VERSIONS,
                          layers=CONV3X3_VERSION_LAYERS) -> list[OpCase]:
    """Forward, data gradient and weight gradient of each 3x3 layer in ``layers``, once per version."""
    cases = []
    for name in layers:
        for case in _conv_cases(net.layer(name), net, F.FUSE_RELU_BACKWARD_DEFAULT):
            if case.op.startswith("conv3x3_"):
                cases += [replace(case, version=v) for v in versions]
    return cases


# The ops that run the conv3x3 kernel version of the precision mode: the 3x3 convolutions, and the
# up-convolutions (the GEMM versions v3-v6 run them on the same engine, csrc/implicit_gemm.cuh).
VERSIONED_OPS = ("conv3x3_", "upconv2x2_")


def with_conv3x3_versions(cases: list[OpCase], versions) -> list[OpCase]:
    """``cases`` with each case of a VERSIONED_OPS op once per version in ``versions`` (in that
    order, side by side); the other cases as they are."""
    out: list[OpCase] = []
    for case in cases:
        if case.op.startswith(VERSIONED_OPS):
            out += [replace(case, version=v) for v in versions]
        else:
            out.append(case)
    return out


def op_cases(net: Network, relu_fused: bool | None = None) -> list[OpCase]:
    """Every op a training step of ``net`` runs, once per layer it runs at, the backward-data ops
    with the pools' backward adding into the skip maps' gradients, and, where ``relu_fused`` (the
    training step's setting when None: ``unet_cuda.functional.FUSE_RELU_BACKWARD_DEFAULT``), the
    backward-data ops with the ReLU masks that gives them; and, with ``in_step`` False: crop +
    concat at each concatenation, which only the unfused path runs, the optimizer's update one
    parameter at a time, the skip maps' separate accumulation, and with ``relu_fused`` the separate
    ReLU backward of the layers whose consumers all fuse it."""
    if relu_fused is None:  # as a training step records its ops (unet_cuda/functional.py)
        relu_fused = F.FUSE_RELU_BACKWARD_DEFAULT
    cases: list[OpCase] = []
    for layer in net.layers:
        cases += _conv_cases(layer, net, relu_fused)
    for pool in net.pools:
        n, c, h = pool.batch, pool.channels, pool.in_hw
        elems = n * c * h * h
        x, y = (n, c, h, h), (n, c, h // 2, h // 2)
        dims = dict(n=n, c=c, h=h)
        cases.append(OpCase("maxpool2x2_forward", pool.name, dims,
                            f"{shape_str('x', x)} -> {shape_str('y', y)} argmax",
                            nbytes=elems * F32 + elems / 4 * (F32 + U8)))
        masked = relu_fused and _skip_layer(net, int(pool.name[len("pool"):]) - 1) not in net.dropout_layers
        # the skip map gets its gradient from the concatenation's backward (first) and from the
        # pool's, which adds its own into it (accumulate_into): dx read and written
        cases.append(OpCase("maxpool2x2_backward", pool.name, dict(dims, relu_mask=masked, accumulate=True),
                            f"{shape_str('dy', y)} argmax{' y' if masked else ''} -> "
                            f"{shape_str('dx', x)} (added into)",
                            nbytes=elems / 4 * (F32 + U8 + (F32 if masked else 0)) + 2 * elems * F32))
        # the same sum as a separate pass, timed beside it (the unfused path)
        cases.append(OpCase("accumulate_", pool.name.replace("pool", "skip"), dims,
                            f"{shape_str('dst', x)} += {shape_str('src', x)}",
                            nbytes=3.0 * F32 * elems, in_step=False, peer_in_step=True))
    for cat in net.concats:
        n, cu, hw, cs, hs = cat.batch, cat.up_channels, cat.hw, cat.skip_channels, cat.skip_hw
        dims = dict(n=n, cu=cu, h=hw, cs=cs, hs=hs)
        up, skip, y = (n, cu, hw, hw), (n, cs, hs, hs), (n, cu + cs, hw, hw)
        out_elems = n * (cu + cs) * hw * hw
        # the unfused path (v1_direct, v2_smem): not part of a step in the precision modes
        cases.append(OpCase("crop_concat_forward", cat.name, dims,
                            f"{shape_str('up', up)} {shape_str('skip', skip)} -> {shape_str('y', y)}",
                            nbytes=2.0 * F32 * out_elems, in_step=False))
        cases.append(OpCase("crop_concat_backward", cat.name, dims,
                            f"{shape_str('dy', y)} -> {shape_str('dup', up)} {shape_str('dskip', skip)}",
                            nbytes=F32 * (out_elems + n * cu * hw * hw + n * cs * hs * hs), in_step=False))
    for name in net.dropout_layers:
        layer = net.layer(name)
        shape = (layer.batch, layer.cout, layer.out_hw, layer.out_hw)
        elems = int(np.prod(shape))
        dims = dict(shape=shape)
        # the step runs the seeded ops (the mask hashed where it is applied, never stored); the
        # stored-mask path is timed beside them
        cases.append(OpCase("dropout_mask", name, dims, f"-> {shape_str('mask', shape)} uint8",
                            nbytes=U8 * elems, in_step=False))
        for op, a, b in (("dropout_forward", "x", "y"), ("dropout_backward", "dy", "dx")):
            cases.append(OpCase(op, name, dims, f"{shape_str(a, shape)} mask -> {shape_str(b, shape)}",
                                nbytes=(2 * F32 + U8) * elems, in_step=False))
        for op, a, b in (("dropout_seeded_forward", "x", "y"), ("dropout_seeded_backward", "dy", "dx")):
            cases.append(OpCase(op, name, dims, f"{shape_str(a, shape)} seed -> {shape_str(b, shape)}",
                                nbytes=2 * F32 * elems))
    out = net.layers[-1]
    shape = (out.batch, out.cout, out.out_hw, out.out_hw)
    pixels = out.batch * out.out_hw ** 2
    elems = int(np.prod(shape))
    dims = dict(shape=shape)
    loss_bytes = 2 * F32 * elems + (I32 + F32) * pixels
    cases.append(OpCase("softmax_xent_forward", "out", dims,
                        f"{shape_str('logits', shape)} labels weights -> loss {shape_str('probs', shape)}",
                        nbytes=loss_bytes))
    cases.append(OpCase("softmax_xent_backward", "out", dims,
                        f"{shape_str('probs', shape)} labels weights -> {shape_str('dlogits', shape)}",
                        nbytes=loss_bytes))
    param_shapes = []
    for layer in net.layers:
        k = {"conv3x3": 3, "upconv2x2": 2, "conv1x1": 1}[layer.kind]
        param_shapes += [(layer.cout, layer.cin, k, k), (layer.cout,)]
    count = sum(int(np.prod(s)) for s in param_shapes)
    # the step's update: one op for all parameters; and the same with one op per parameter (not in
    # the step since it runs the first; timed beside it)
    cases.append(OpCase("sgd_momentum_update_multi_", "all", {},
                        f"{len(param_shapes)} tensors, {count:,} parameters",
                        nbytes=5.0 * F32 * count, param_shapes=tuple(param_shapes)))
    cases.append(OpCase("sgd_momentum_update_", "all", {}, f"{len(param_shapes)} tensors, {count:,} parameters",
                        nbytes=5.0 * F32 * count, param_shapes=tuple(param_shapes), in_step=False))
    size = net.tile + 2 * AUGMENT_MARGIN
    window = (size, size)
    cases.append(OpCase("augment_warp", "window", dict(h=size),
                        f"image labels weights {shape_str('', window)} coarse[2,3,3] -> "
                        f"3 x {shape_str('', window)}",
                        nbytes=2.0 * (2 * F32 + I32) * size * size))
    return cases


# ------------------------------------------------------------------------------------------------
# Inputs: fresh random data, never zeros
# ------------------------------------------------------------------------------------------------


class Random:
    """Seeded float32 random arrays on NumPy or CuPy."""

    def __init__(self, xp, seed: int):
        self.xp = xp
        if xp is np:
            self._gen = np.random.default_rng(seed)
        else:
            self._gen = xp.random.RandomState(seed)

    def normal(self, shape, std: float = 1.0):
        if self.xp is np:
            a = self._gen.standard_normal(shape, dtype=np.float32)
        else:
            a = self._gen.standard_normal(shape, dtype=self.xp.float32)
        if std != 1.0:
            a *= np.float32(std)
        return a

    def uniform(self, shape, low: float = 0.0, high: float = 1.0):
        if self.xp is np:
            a = self._gen.random(shape, dtype=np.float32)
        else:
            a = self._gen.random_sample(shape, dtype=self.xp.float32)
        return (a * np.float32(high - low) + np.float32(low)).astype(np.float32, copy=False)

    def labels(self, shape, k: int):
        a = (self.uniform(shape) * k).astype(np.int32)
        return self.xp.minimum(a, k - 1).astype(np.int32)


def _he(rng: Random, shape, fan_in: int):
    return rng.normal(shape, float(np.sqrt(2.0 / fan_in)))


def make_inputs(case: OpCase, xp, ops) -> dict:
    """The arrays ``case`` needs, on ``xp`` (NumPy or CuPy); ``ops`` makes derived inputs
    (the pool's argmax) with the backend under test."""
    rng = Random(xp, case.seed)
    d = case.dims
    op = case.op
    if op.startswith("conv3x3_concat"):
        n, cu, cs, hs, o, h, p = d["n"], d["cu"], d["cs"], d["hs"], d["o"], d["h"], d["p"]
        return dict(up=rng.normal((n, cu, h, h)), skip=rng.normal((n, cs, hs, hs)),
                    w=_he(rng, (o, cu + cs, 3, 3), (cu + cs) * 9), b=rng.normal((o,), 0.1),
                    dy=rng.normal((n, o, p, p), 1e-3))
    if op.startswith(("conv3x3", "upconv2x2", "conv1x1")):
        n, c, o, h, p, k = d["n"], d["c"], d["o"], d["h"], d["p"], d["k"]
        fan_in = c if op.startswith("upconv") else c * k * k
        return dict(x=rng.normal((n, c, h, h)), w=_he(rng, (o, c, k, k), fan_in),
                    b=rng.normal((o,), 0.1), dy=rng.normal((n, o, p, p), 1e-3))
    if op == "relu_backward":
        n, o, p = d["n"], d["o"], d["p"]
        return dict(y=xp.maximum(rng.normal((n, o, p, p)), 0), dy=rng.normal((n, o, p, p)))
    if op.startswith("maxpool2x2"):
        n, c, h = d["n"], d["c"], d["h"]
        x = rng.normal((n, c, h, h))
        inputs = dict(x=x, dy=rng.normal((n, c, h // 2, h // 2)))
        if op == "maxpool2x2_backward":
            inputs["y"], inputs["argmax"] = ops.maxpool2x2_forward(x)
            inputs["dx"] = rng.normal((n, c, h, h))  # what the concatenation's backward left there
        return inputs
    if op == "accumulate_":
        n, c, h = d["n"], d["c"], d["h"]
        return dict(dst=rng.normal((n, c, h, h)), src=rng.normal((n, c, h, h)))
    if op.startswith("crop_concat"):
        n, cu, h, cs, hs = d["n"], d["cu"], d["h"], d["cs"], d["hs"]
        return dict(up=rng.normal((n, cu, h, h)), skip=rng.normal((n, cs, hs, hs)),
                    dy=rng.normal((n, cu + cs, h, h)))
    if op.startswith("dropout"):
        shape = d["shape"]
        mask = (rng.uniform(shape) >= DROPOUT_P).astype(np.uint8)
        return dict(x=rng.normal(shape), mask=mask)
    if op.startswith("softmax_xent"):
        shape = d["shape"]
        n, k, h, w = shape
        logits = rng.normal(shape, 3.0)
        e = xp.exp(logits - logits.max(axis=1, keepdims=True))
        return dict(logits=logits, probs=(e / e.sum(axis=1, keepdims=True)).astype(np.float32),
                    labels=rng.labels((n, h, w), k), weights=rng.uniform((n, h, w), 0.5, 10.0))
    if op == "augment_warp":
        h = d["h"]
        nodes = np.random.default_rng(case.seed).normal(0.0, 10.0, (2, 3, 3)).astype(np.float32)
        return dict(image=rng.uniform((h, h)), labels=rng.labels((h, h), 2),
                    weights=rng.uniform((h, h), 1.0, 11.0), coarse=xp.asarray(nodes))
    if op in ("sgd_momentum_update_", "sgd_momentum_update_multi_"):
        return dict(params=[rng.normal(s, 0.05) for s in case.param_shapes],
                    grads=[rng.normal(s, 1e-3) for s in case.param_shapes],
                    velocity=[rng.normal(s, 1e-5) for s in case.param_shapes])
    raise KeyError(f"no inputs defined for op {op}")


# ------------------------------------------------------------------------------------------------
# Our call
# ------------------------------------------------------------------------------------------------


def ours(case: OpCase, inputs: dict, ops) -> Callable[[], object]:
    """A zero-argument call of ``unet_cuda.ops.<case.op>`` on ``inputs``."""
    a = inputs
    op = case.op
    if op == "conv3x3_forward":
        return lambda: ops.conv3x3_forward(a["x"], a["w"], a["b"], True)
    if op == "conv3x3_concat_forward":
        return lambda: ops.conv3x3_concat_forward(a["up"], a["skip"], a["w"], a["b"], True)
    if op == "conv3x3_concat_backward_data":
        skip_shape = tuple(a["skip"].shape)
        skip_mask = a["skip"] if case.dims.get("skip_relu_mask") else None
        return lambda: ops.conv3x3_concat_backward_data(a["dy"], a["w"], skip_shape,
                                                        skip_relu_mask=skip_mask)
    if op == "conv3x3_concat_backward_weight":
        return lambda: ops.conv3x3_concat_backward_weight(a["up"], a["skip"], a["dy"])
    if op in ("upconv2x2_forward", "conv1x1_forward"):
        fn = getattr(ops, op)
        return lambda: fn(a["x"], a["w"], a["b"])
    if op.endswith("_backward_data"):
        fn = getattr(ops, op)
        mask = a["x"] if case.dims.get("relu_mask") else None
        return lambda: fn(a["dy"], a["w"], relu_mask=mask)
    if op.endswith("_backward_weight"):
        fn = getattr(ops, op)
        return lambda: fn(a["x"], a["dy"])
    if op == "relu_backward":
        return lambda: ops.relu_backward(a["y"], a["dy"])
    if op == "maxpool2x2_forward":
        return lambda: ops.maxpool2x2_forward(a["x"])
    if op == "maxpool2x2_backward":
        mask = a["y"] if case.dims.get("relu_mask") else None
        into = a["dx"] if case.dims.get("accumulate") else None
        return lambda: ops.maxpool2x2_backward(a["dy"], a["argmax"], relu_mask=mask, accumulate_into=into)
    if op == "accumulate_":
        return lambda: ops.accumulate_(a["dst"], a["src"])
    if op == "crop_concat_forward":
        return lambda: ops.crop_concat_forward(a["up"], a["skip"])
    if op == "crop_concat_backward":
        skip_shape = tuple(a["skip"].shape)
        return lambda: ops.crop_concat_backward(a["dy"], skip_shape)
    if op == "dropout_mask":
        shape = tuple(case.dims["shape"])
        return lambda: ops.dropout_mask(shape, DROPOUT_P, 12345, like=a["x"])
    if op == "dropout_forward":
        return lambda: ops.dropout_forward(a["x"], a["mask"], DROPOUT_P)
    if op == "dropout_backward":
        return lambda: ops.dropout_backward(a["x"], a["mask"], DROPOUT_P)
    if op == "dropout_seeded_forward":
        return lambda: ops.dropout_seeded_forward(a["x"], DROPOUT_P, 12345)
    if op == "dropout_seeded_backward":
        return lambda: ops.dropout_seeded_backward(a["x"], DROPOUT_P, 12345)
    if op == "softmax_xent_forward":
        return lambda: ops.softmax_xent_forward(a["logits"], a["labels"], a["weights"])
    if op == "softmax_xent_backward":
        return lambda: ops.softmax_xent_backward(a["probs"], a["labels"], a["weights"], 1.0)
    if op == "augment_warp":
        return lambda: ops.augment_warp(a["image"], a["labels"], a["weights"], a["coarse"], *AUGMENT_ARGS)
    if op == "sgd_momentum_update_":
        triples = list(zip(a["params"], a["grads"], a["velocity"]))

        def update_all():
            for p, g, v in triples:
                ops.sgd_momentum_update_(p, g, v, LR, MOMENTUM, WEIGHT_DECAY)

        return update_all
    if op == "sgd_momentum_update_multi_":
        return lambda: ops.sgd_momentum_update_multi_(a["params"], a["grads"], a["velocity"], LR,
                                                      MOMENTUM, WEIGHT_DECAY)
    raise KeyError(f"no call defined for op {op}")


# ------------------------------------------------------------------------------------------------
# The peer: the same work through PyTorch
# ------------------------------------------------------------------------------------------------


def peer_description(case: OpCase, precision: str = "fp32") -> str:
    """What the peer of ``case`` runs; a bf16 convolution peer says so."""
    text = _peer_description(case)
    if precision == "bf16" and case.compute_bound:
        text += " (bf16, channels_last)"
    elif precision == "tf32" and case.compute_bound:
        text += " (TF32)"
    return text


def _peer_description(case: OpCase) -> str:
    op = case.op
    if op == "conv3x3_concat_forward":
        return "cat + cuDNN conv2d + relu_"
    if op == "conv3x3_concat_backward_data":
        return "cuDNN convolution_backward + split (contiguous + zeros + slice copy)"
    if op == "conv3x3_concat_backward_weight":
        return "cuDNN convolution_backward (on the stored concatenation)"
    if op == "conv3x3_forward":
        return "cuDNN conv2d + relu_"
    if op in ("upconv2x2_forward",):
        return "cuDNN conv_transpose2d"
    if op == "conv1x1_forward":
        return "cuDNN conv2d"
    if "_backward_" in op and op.split("_")[0] in ("conv3x3", "upconv2x2", "conv1x1"):
        return "cuDNN convolution_backward"
    return {
        "relu_backward": "threshold_backward",
        "maxpool2x2_forward": "max_pool2d_with_indices",
        "maxpool2x2_backward": "max_pool2d_with_indices_backward",
        "accumulate_": "add_",
        "crop_concat_forward": "cat + slice",
        "crop_concat_backward": "contiguous + zeros + slice copy",
        "dropout_mask": "bernoulli_ (uint8)",
        "dropout_forward": "native_dropout_backward (mask * scale)",
        "dropout_backward": "native_dropout_backward (mask * scale)",
        "dropout_seeded_forward": "native_dropout (mask drawn, applied and stored)",
        "dropout_seeded_backward": "native_dropout_backward (mask * scale)",
        "softmax_xent_forward": "cross_entropy(none) * w, sum + softmax",
        "softmax_xent_backward": "clone + scatter_add_ + mul_",
        "sgd_momentum_update_": "_foreach Caffe momentum rule",
        "sgd_momentum_update_multi_": "_foreach Caffe momentum rule",
        "augment_warp": "interpolate(bicubic) + 3 grid_sample + flip/rot90 + gray",
    }[op]


def to_torch(torch, a):
    """A PyTorch tensor over the memory of ``a`` (NumPy or CuPy), no copy."""
    if isinstance(a, np.ndarray):
        return torch.from_numpy(a)
    return torch.from_dlpack(a)


def _bf16_channels_last(torch, a):
    """A bf16 copy of ``a``; channels_last where it is 4-D (the layout of autocast's fast path)."""
    a = a.to(torch.bfloat16)
    return a.contiguous(memory_format=torch.channels_last) if a.dim() == 4 else a


def peer(case: OpCase, inputs: dict, torch, precision: str = "fp32") -> Callable[[], object]:
    """A zero-argument PyTorch call doing ``case``'s work on the memory of ``inputs``.

    ``precision`` "bf16" gives a convolution bf16 copies of its operands in channels_last (made here,
    once); "fp32" and "tf32" use the float32 inputs themselves, and which of the two cuDNN runs is
    the caller's ``torch.backends.cudnn.allow_tf32``. Other ops ignore ``precision``.
    """
    if precision not in PEER_PRECISIONS:
        raise ValueError(f"peer precision must be one of {PEER_PRECISIONS}, got {precision!r}")
    F = torch.nn.functional
    aten = torch.ops.aten
    t = {k: to_torch(torch, v) for k, v in inputs.items() if not isinstance(v, list)}
    op = case.op
    if op.startswith("conv3x3_concat"):
        return _concat_conv_peer(op, t, torch, precision)
    if op.startswith(("conv3x3", "upconv2x2", "conv1x1")):
        transposed = op.startswith("upconv")
        stride = [2, 2] if transposed else [1, 1]
        # PyTorch's transposed convolution weight is [Cin, Cout, kH, kW]; ours is [Cout, Cin, kH, kW].
        w = t["w"].transpose(0, 1).contiguous() if transposed else t["w"]
        x, b, dy = t["x"], t["b"], t["dy"]
        if precision == "bf16":
            x, w, b, dy = (_bf16_channels_last(torch, a) for a in (x, w, b, dy))

        def backward(mask):
            return aten.convolution_backward(dy, x, w, [w.shape[1] if transposed else w.shape[0]],
                                             stride, [0, 0], [1, 1], transposed, [0, 0], 1, mask)

        if op == "conv3x3_forward":
            return lambda: F.relu(F.conv2d(x, w, b), inplace=True)
        if op == "conv1x1_forward":
            return lambda: F.conv2d(x, w, b)
        if op == "upconv2x2_forward":
            return lambda: F.conv_transpose2d(x, w, b, stride=2)
        if op.endswith("_backward_data"):
            return lambda: backward([True, False, False])
        return lambda: backward([False, True, True])
    if op == "relu_backward":
        return lambda: aten.threshold_backward(t["dy"], t["y"], 0.0)
    if op == "maxpool2x2_forward":
        return lambda: aten.max_pool2d_with_indices(t["x"], [2, 2], [2, 2])
    if op == "maxpool2x2_backward":
        x, dy = t["x"], t["dy"]
        _, indices = aten.max_pool2d_with_indices(x, [2, 2], [2, 2])
        return lambda: aten.max_pool2d_with_indices_backward(dy, x, [2, 2], [2, 2], [0, 0], [1, 1],
                                                             False, indices)
    if op == "accumulate_":
        return lambda: t["dst"].add_(t["src"])
    if op.startswith("crop_concat"):
        up, skip, dy = t["up"], t["skip"], t["dy"]
        cu, h = up.shape[1], up.shape[2]
        o = (skip.shape[2] - h) // 2
        if op == "crop_concat_forward":
            return lambda: torch.cat([up, skip[:, :, o:o + h, o:o + h]], 1)

        def split():
            dup = dy[:, :cu].contiguous()
            dskip = torch.zeros_like(skip)
            dskip[:, :, o:o + h, o:o + h] = dy[:, cu:]
            return dup, dskip

        return split
    if op == "dropout_mask":
        shape = tuple(case.dims["shape"])
        device = t["x"].device
        return lambda: torch.empty(shape, dtype=torch.uint8, device=device).bernoulli_(1.0 - DROPOUT_P)
    if op in ("dropout_forward", "dropout_backward", "dropout_seeded_backward"):
        keep = t["mask"].bool()
        scale = 1.0 / (1.0 - DROPOUT_P)
        return lambda: aten.native_dropout_backward(t["x"], keep, scale)
    if op == "dropout_seeded_forward":
        return lambda: aten.native_dropout(t["x"], DROPOUT_P, True)
    if op.startswith("softmax_xent"):
        logits, probs, weights = t["logits"], t["probs"], t["weights"]
        labels = t["labels"].long()
        pixels = labels.numel()
        if op == "softmax_xent_forward":
            def loss_and_probs():
                loss = (F.cross_entropy(logits, labels, reduction="none") * weights).sum() / pixels
                return loss, torch.softmax(logits, 1)

            return loss_and_probs
        index = labels.unsqueeze(1)
        minus_one = torch.full(index.shape, -1.0, dtype=probs.dtype, device=probs.device)
        scale = (weights / pixels).unsqueeze(1)

        def dlogits():
            g = probs.clone()
            g.scatter_add_(1, index, minus_one)
            return g.mul_(scale)

        return dlogits
    if op in ("sgd_momentum_update_", "sgd_momentum_update_multi_"):
        params = [to_torch(torch, p) for p in inputs["params"]]
        grads = [to_torch(torch, g) for g in inputs["grads"]]
        velocity = [to_torch(torch, v) for v in inputs["velocity"]]

        def caffe_update():
            torch._foreach_mul_(velocity, MOMENTUM)
            torch._foreach_add_(velocity, grads, alpha=LR)
            torch._foreach_sub_(params, velocity)

        return caffe_update
    if op == "augment_warp":
        return _augment_peer(torch, t)
    raise KeyError(f"no peer defined for op {op}")


def _concat_conv_peer(op: str, t: dict, torch, precision: str) -> Callable[[], object]:
    """The decoder's first convolution of a level as PyTorch runs it: on the concatenation."""
    F = torch.nn.functional
    aten = torch.ops.aten
    up, skip, w, b, dy = t["up"], t["skip"], t["w"], t["b"], t["dy"]
    if precision == "bf16":
        up, skip, w, b, dy = (_bf16_channels_last(torch, a) for a in (up, skip, w, b, dy))
    cu, h = up.shape[1], up.shape[2]
    o = (skip.shape[2] - h) // 2

    def concat():
        return torch.cat([up, skip[:, :, o:o + h, o:o + h]], 1)

    if op == "conv3x3_concat_forward":
        return lambda: F.relu(F.conv2d(concat(), w, b), inplace=True)
    x = concat()   # PyTorch keeps the concatenation of the forward pass for the backward

    def backward(mask):
        return aten.convolution_backward(dy, x, w, [w.shape[0]], [1, 1], [0, 0], [1, 1], False,
                                         [0, 0], 1, mask)

    if op == "conv3x3_concat_backward_data":
        def data_and_split():
            dx = backward([True, False, False])[0]
            dskip = torch.zeros_like(skip)
            dskip[:, :, o:o + h, o:o + h] = dx[:, cu:]
            return dx[:, :cu].contiguous(), dskip

        return data_and_split
    return lambda: backward([False, True, True])


def _augment_peer(torch, t: dict) -> Callable[[], object]:
    F = torch.nn.functional
    image, labels, weights, coarse = t["image"], t["labels"], t["weights"], t["coarse"]
    h, w = image.shape
    turns, flip_rows, flip_columns, gamma, contrast, brightness = AUGMENT_ARGS
    rows, columns = torch.meshgrid(torch.arange(h, dtype=image.dtype, device=image.device),
                                   torch.arange(w, dtype=image.dtype, device=image.device), indexing="ij")
    # grid_sample takes (x, y) scaled to [-1, 1] over the pixel centres (align_corners=True)
    to_unit = torch.tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)], dtype=image.dtype, device=image.device)

    def augment():
        field = F.interpolate(coarse[None], size=(h, w), mode="bicubic", align_corners=True)[0]
        grid = (torch.stack([columns + field[1], rows + field[0]], dim=-1) * to_unit - 1.0)[None]

        def sample(a, mode):
            return F.grid_sample(a[None, None], grid, mode=mode, padding_mode="reflection",
                                 align_corners=True)[0, 0]

        outputs = [sample(image, "bicubic").clamp_(0.0, 1.0), sample(labels.float(), "nearest").to(torch.int32),
                   sample(weights, "bilinear")]
        for k, a in enumerate(outputs):
            if flip_rows:
                a = a.flip(0)
            if flip_columns:
                a = a.flip(1)
            outputs[k] = torch.rot90(a, turns).contiguous()
        outputs[0] = ((outputs[0] ** gamma - 0.5) * contrast + 0.5 + brightness).clamp_(0.0, 1.0)
        return tuple(outputs)

    return augment
