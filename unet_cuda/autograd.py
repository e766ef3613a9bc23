"""A small reverse-mode autograd: a tape of Tensors, each knowing its parents and how to pass a
gradient back to them.

The engine knows nothing of convolutions or GPUs. An op (see ``functional.py``) computes its output
with ``unet_cuda.ops`` and hands ``Tensor.from_op`` a closure that maps the output's gradient to its
parents' gradients, again with ``unet_cuda.ops``. ``Tensor.backward`` sorts the graph
topologically and runs those closures from the output back to the leaves, adding gradients where a
tensor feeds several ops.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

from . import ops

__all__ = ["Tensor", "no_grad", "is_grad_enabled"]

_grad_enabled = True


def is_grad_enabled() -> bool:
    return _grad_enabled


@contextlib.contextmanager
def no_grad():
    """Within this block ops record nothing (inference)."""
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = previous


BackwardFn = Callable[[object], Sequence[object]]


class Tensor:
    """An array (NumPy or CuPy) with an optional gradient and the op that produced it.

    ``data``: the value. ``grad``: the gradient of the output that ``backward`` started from
    (same shape, same backend), or None. Leaves are made by the user (parameters, inputs); other
    tensors by ops.
    """

    __slots__ = ("data", "grad", "requires_grad", "name", "_parents", "_backward")

    def __init__(self, data, requires_grad: bool = False, name: str = ""):
        self.data = data
        self.grad = None
        self.requires_grad = requires_grad
        self.name = name
        self._parents: tuple[Tensor, ...] = ()
        self._backward: BackwardFn | None = None

    @classmethod
    def from_op(cls, data, parents: Sequence["Tensor"], backward: BackwardFn, name: str) -> "Tensor":
        """The output of an op. Records ``backward`` only if some parent needs a gradient."""
        needs_grad = _grad_enabled and any(p.requires_grad for p in parents)
        out = cls(data, requires_grad=needs_grad, name=name)
        if needs_grad:
            out._parents = tuple(parents)
            out._backward = backward
        return out

    @property
    def shape(self):
        return self.data.shape

    @property
    def device(self) -> str:
        return ops.device_of(self.data)

    def numpy(self):
        return ops.to_numpy(self.data)

    def __repr__(self) -> str:
        what = f" {self.name}" if self.name else ""
        return f"Tensor{what}(shape={tuple(self.shape)}, device={self.device}, requires_grad={self.requires_grad})"

    def _topological_order(self) -> list["Tensor"]:
        order, seen = [], set()
        stack = [(self, False)]
        while stack:  # iterative depth-first search: deep graphs never hit the recursion limit
            node, expanded = stack.pop()
            if expanded:
                order.append(node)
                continue
            if id(node) in seen:
                continue
            seen.add(id(node))
            stack.append((node, True))
            stack.extend((p, False) for p in node._parents if p.requires_grad)
        return order

    def backward(self, grad=None) -> None:
        """Accumulate d(self)/d(leaf) into every leaf's ``.grad``.

        ``grad`` defaults to 1 for a scalar (0-d) output. Gradients of intermediate tensors are
        released as soon as they have been passed on, and the graph is freed afterwards.
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require a gradient")
        if grad is None:
            if self.data.ndim != 0:
                raise RuntimeError(f"backward() needs an explicit gradient for a non-scalar output {self!r}")
            grad = 1.0
        self.grad = grad
        for node in reversed(self._topological_order()):
            if node._backward is None:
                continue
            parent_grads = node._backward(node.grad)
            if len(parent_grads) != len(node._parents):
                raise RuntimeError(f"op {node.name} returned {len(parent_grads)} gradients for "
                                   f"{len(node._parents)} inputs")
            for parent, g in zip(node._parents, parent_grads):
                if g is None or not parent.requires_grad:
                    continue
                if parent.grad is None:
                    parent.grad = g
                else:
                    ops.accumulate_(parent.grad, g)
            node.grad = None
            node._parents = ()
            node._backward = None
