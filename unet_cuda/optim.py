"""SGD with momentum, Caffe's rule (the paper trained with Caffe, momentum 0.99):

    v <- momentum * v + lr * (grad + weight_decay * param)
    param <- param - v

The update itself is an op (``sgd_momentum_update_multi_``: all parameters at once), so it runs in
our kernel on the GPU. The rate of one step may be given to ``step`` as a 0-d float32 array on the
parameters' device: the kernel then reads it when it runs, which is what a captured CUDA graph
needs (``unet_cuda.graph``).
"""

from __future__ import annotations

import numpy as np

from . import ops
from .autograd import Tensor

__all__ = ["SGD"]


class SGD:
    def __init__(self, params, lr: float = 0.01, momentum: float = 0.99, weight_decay: float = 0.0):
        self.params: list[Tensor] = list(params)
        if not self.params:
            raise ValueError("SGD: no parameters to optimise")
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"SGD: {name} must be a finite number >= 0, got {value!r}")
        if momentum >= 1:
            raise ValueError(f"SGD: momentum must be < 1, got {momentum!r}")
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self.velocity = [ops.array_module(p.data).zeros_like(p.data) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self, lr=None) -> None:
        """Update every parameter that has a gradient.

        ``lr``: the rate of this step instead of ``self.lr``: a number, or a 0-d float32 array on the
        parameters' device, whose value the update kernel reads when it runs (docs/OPS.md).
        """
        rate = self.lr if lr is None else lr
        updated = [(p, v) for p, v in zip(self.params, self.velocity) if p.grad is not None]
        for p, v in updated:
            if v.shape != p.data.shape or ops.device_of(v) != ops.device_of(p.data):
                raise RuntimeError(f"SGD: state of {p.name} does not match the parameter "
                                   f"({v.shape} on {ops.device_of(v)} vs {p.data.shape} on {ops.device_of(p.data)})")
        # one op for all of them: on the GPU one launch per 32 parameters, not one each
        ops.sgd_momentum_update_multi_([p.data for p, _ in updated], [p.grad for p, _ in updated],
                                       [v for _, v in updated], rate, self.momentum, self.weight_decay)

    def state_dict(self) -> dict:
        return {"lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay,
                "velocity": [ops.to_numpy(v).copy() for v in self.velocity]}

    def load_state_dict(self, state: dict) -> None:
        velocity = state["velocity"]
        if len(velocity) != len(self.params):
            raise ValueError(f"SGD.load_state_dict: {len(velocity)} velocity buffers for {len(self.params)} parameters")
        new = []
        for p, v in zip(self.params, velocity):
            v = np.asarray(ops.to_numpy(v), dtype=np.float32)
            if v.shape != p.data.shape:
                raise ValueError(f"SGD.load_state_dict: velocity of shape {v.shape} for {p.name} of shape {p.data.shape}")
            new.append(ops.to_device(np.ascontiguousarray(v), ops.device_of(p.data)))
        self.velocity = new
        self.lr, self.momentum, self.weight_decay = float(state["lr"]), float(state["momentum"]), float(state["weight_decay"])
