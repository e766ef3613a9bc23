"""The U-Net of Ronneberger, Fischer and Brox (2015), exactly as ../docs/PAPER.md restates it.

Contracting path: per level two valid 3x3 conv + ReLU, then a 2x2 max-pool. Expanding path: per
level a 2x2 stride-2 up-convolution halving the channels, concatenation ``[upsampled, centre-cropped
skip]``, two valid 3x3 conv + ReLU. A final 1x1 convolution gives the class scores. Dropout (p =
0.5 in the release) follows the second convolution of the two deepest contracting levels, before
the pool and the skip, in training only. Weights are Gaussian with std sqrt(2 / fan-in), biases 0.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from . import functional as F
from . import ops, sizes
from .autograd import Tensor

__all__ = ["UNet"]


class UNet:
    """U-Net with ``depth`` resolution levels (5 in the paper) and ``base_channels`` at the top (64).

    >>> net = UNet()                      # the paper's network: 23 conv layers, 31,030,658 parameters
    >>> net.output_size(572)
    388
    >>> logits = net(Tensor(x))           # x: float32 [N, in_channels, 572, 572], NumPy or CuPy

    ``device`` ("cpu" or "cuda") says where the parameters live; inputs must be on the same device.
    ``seed`` fixes the initial weights (drawn on the host, so identical on every device) and the
    dropout masks.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, base_channels: int = 64,
                 depth: int = 5, dropout: float = 0.5, seed: int = 0, device: str = "cpu"):
        for name, value, low in (("in_channels", in_channels, 1), ("num_classes", num_classes, 2),
                                 ("base_channels", base_channels, 1), ("depth", depth, 1)):
            if not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"UNet: {name} must be an integer >= {low}, got {value!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"UNet: dropout must be in [0, 1), got {dropout!r}")
        self.config = dict(in_channels=int(in_channels), num_classes=int(num_classes),
                           base_channels=int(base_channels), depth=int(depth), dropout=float(dropout))
        self.depth = int(depth)
        self.dropout_p = float(dropout)
        self.training = True
        self.device = "cpu"
        self._params: OrderedDict[str, Tensor] = OrderedDict()
        init_rng = np.random.default_rng(seed)
        self.dropout_rng = np.random.default_rng([seed, 1])

        def channels(level: int) -> int:
            return base_channels * 2 ** level

        c_in = in_channels
        for level in range(depth):
            self._conv(f"down{level}.conv1", channels(level), c_in, 3, init_rng)
            self._conv(f"down{level}.conv2", channels(level), channels(level), 3, init_rng)
            c_in = channels(level)
        for level in reversed(range(depth - 1)):
            # One output pixel of a stride-2 up-convolution sees one tap per input channel.
            self._conv(f"up{level}.upconv", channels(level), channels(level + 1), 2, init_rng,
                       fan_in=channels(level + 1))
            self._conv(f"up{level}.conv1", channels(level), 2 * channels(level), 3, init_rng)
            self._conv(f"up{level}.conv2", channels(level), channels(level), 3, init_rng)
        self._conv("head.conv1x1", num_classes, base_channels, 1, init_rng)
        self.to(device)

    def _conv(self, name: str, c_out: int, c_in: int, k: int, rng, fan_in: int | None = None) -> None:
        fan_in = fan_in if fan_in is not None else c_in * k * k
        w = rng.normal(0.0, np.sqrt(2.0 / fan_in), size=(c_out, c_in, k, k)).astype(np.float32)
        self._params[f"{name}.weight"] = Tensor(w, requires_grad=True, name=f"{name}.weight")
        self._params[f"{name}.bias"] = Tensor(np.zeros(c_out, np.float32), requires_grad=True,
                                              name=f"{name}.bias")

    # ---------------------------------------------------------------- parameters and state
    def parameters(self) -> list[Tensor]:
        return list(self._params.values())

    def named_parameters(self) -> list[tuple[str, Tensor]]:
        return list(self._params.items())

    def num_parameters(self) -> int:
        return int(sum(p.data.size for p in self._params.values()))

    def num_conv_layers(self) -> int:
        return sum(1 for name in self._params if name.endswith(".weight"))

    def state_dict(self) -> dict[str, np.ndarray]:
        """Parameters as NumPy arrays (copies), by name."""
        return {name: ops.to_numpy(p.data).copy() for name, p in self._params.items()}

    def load_state_dict(self, state: dict) -> None:
        missing = [n for n in self._params if n not in state]
        unexpected = [n for n in state if n not in self._params]
        if missing or unexpected:
            raise ValueError(f"UNet.load_state_dict: parameters do not match this architecture "
                             f"{self.config}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for name, p in self._params.items():
            value = np.asarray(ops.to_numpy(state[name]), dtype=np.float32)
            if value.shape != p.data.shape:
                raise ValueError(f"UNet.load_state_dict: {name} has shape {value.shape}, this "
                                 f"architecture {self.config} needs {p.data.shape}")
            p.data = ops.to_device(np.ascontiguousarray(value), self.device)
            p.grad = None

    def to(self, device: str) -> "UNet":
        """Move the parameters to ``"cpu"`` or ``"cuda"``."""
        if device not in ("cpu", "cuda"):
            raise ValueError(f"UNet.to: device must be 'cpu' or 'cuda', got {device!r}")
        for p in self._params.values():
            p.data = ops.to_device(p.data, device)
            p.grad = None
        self.device = device
        return self

    def train(self, mode: bool = True) -> "UNet":
        self.training = mode
        return self

    def eval(self) -> "UNet":
        return self.train(False)

    # ---------------------------------------------------------------- sizes
    def output_size(self, n: int) -> int:
        """Output size for an ``n`` x ``n`` input; raises IllegalSizeError naming the nearest legal sizes."""
        return sizes.output_size(n, self.depth)

    def legal_input_sizes(self, max_size: int = 1024) -> list[int]:
        return sizes.legal_input_sizes(self.depth, max_size)

    # ---------------------------------------------------------------- forward
    def _dropout_levels(self) -> set[int]:
        return {level for level in (self.depth - 2, self.depth - 1) if level >= 0}

    def num_dropout_layers(self) -> int:
        """How many dropout masks a training forward draws (0 when dropout is off)."""
        return len(self._dropout_levels()) if self.dropout_p > 0.0 else 0

    def draw_dropout_seeds(self) -> list[int]:
        """The seeds of the next training forward's dropout masks, drawn from ``dropout_rng``.

        A training forward without ``dropout_seeds`` draws exactly these, in this order (one per
        dropout layer, in the order the forward meets them); drawing them first and passing them in gives
        the same masks and leaves ``dropout_rng`` in the same state. A graphed training step does so:
        its forward reads the seeds from device memory, written by the host every step.
        """
        return [int(self.dropout_rng.integers(0, 2**63)) for _ in range(self.num_dropout_layers())]

    def __call__(self, x, dropout_seeds=None) -> Tensor:
        return self.forward(x, dropout_seeds)

    def forward(self, x, dropout_seeds=None) -> Tensor:
        """Class scores (logits) ``[N, num_classes, out, out]`` for input ``[N, in_channels, n, n]``.

        ``dropout_seeds``: in training, the seeds of the dropout masks (``num_dropout_layers()`` of
        them: ints, or 0-d uint64 arrays on the parameters' device, read when the dropout kernels run);
        by default they are drawn from ``dropout_rng`` (``draw_dropout_seeds``). Unused in eval mode.
        """
        if not isinstance(x, Tensor):
            x = Tensor(x)
        self._check_input(x)
        p = self._params
        use_dropout = self.training and self.dropout_p > 0.0
        if use_dropout:
            seeds = self.draw_dropout_seeds() if dropout_seeds is None else list(dropout_seeds)
            if len(seeds) != self.num_dropout_layers():
                raise ValueError(f"UNet: dropout_seeds must hold {self.num_dropout_layers()} seeds (one "
                                 f"per dropout layer), got {len(seeds)}")
            seeds = iter(seeds)
        skips = []
        h = x
        for level in range(self.depth):
            h = F.conv3x3(h, p[f"down{level}.conv1.weight"], p[f"down{level}.conv1.bias"])
            h = F.conv3x3(h, p[f"down{level}.conv2.weight"], p[f"down{level}.conv2.bias"])
            if use_dropout and level in self._dropout_levels():
                h = F.dropout(h, self.dropout_p, next(seeds))
            if level < self.depth - 1:
                skips.append(h)
                h = F.max_pool2x2(h)
        for level in reversed(range(self.depth - 1)):
            h = F.up_conv2x2(h, p[f"up{level}.upconv.weight"], p[f"up{level}.upconv.bias"])
            # [h, centre crop of the skip] convolved in one op (the concatenation is never stored)
            h = F.conv3x3_concat(h, skips[level], p[f"up{level}.conv1.weight"], p[f"up{level}.conv1.bias"])
            h = F.conv3x3(h, p[f"up{level}.conv2.weight"], p[f"up{level}.conv2.bias"])
        return F.conv1x1(h, p["head.conv1x1.weight"], p["head.conv1x1.bias"])

    def _check_input(self, x: Tensor) -> None:
        shape = tuple(x.shape)
        c = self.config["in_channels"]
        if len(shape) != 4 or shape[1] != c:
            raise ValueError(f"UNet: input must have shape [N, {c}, H, W], got {shape}")
        if x.device != self.device:
            raise ValueError(f"UNet: input is on {x.device} but the parameters are on {self.device}")
        dtype = self._params["head.conv1x1.weight"].data.dtype
        if x.data.dtype != dtype:
            raise ValueError(f"UNet: input must be {dtype} like the parameters, got {x.data.dtype}")
        for n in shape[2:]:
            sizes.plan(n, self.depth)  # raises IllegalSizeError naming the nearest legal sizes

    def __repr__(self) -> str:
        cfg = ", ".join(f"{k}={v}" for k, v in self.config.items())
        return f"UNet({cfg}; {self.num_conv_layers()} conv layers, {self.num_parameters():,} parameters, {self.device})"
