"""A small reverse-mode autograd: a tape of Tensors, each knowing its parents and how to pass a
gradient back to them.

The engine knows nothing of convolutions or GPUs. An op (see ``functional.py``) computes its output
with ``unet_cuda.ops`` and hands ``Tensor.from_op`` a closure that maps the output's gradient to its
parents' gradients, again with ``unet_cuda.ops``. ``Tensor.backward`` sorts the graph
topologically and runs those closures from the output back to the leaves, adding gradients where a
tensor feeds several ops.

One thing the engine does know is the ReLU, because its backward can be fused into the ops that
consume its output. An op whose output ends in a ReLU says so (``relu=True``); its closure then
receives the gradient already passed back through that ReLU. The engine applies the ReLU's backward
(``ops.relu_backward``) itself, unless every op that consumed the output already did so in its own
kernel (``masked``: it took the ReLU's output as its gradient's ``relu_mask``). Masking each
contribution and then summing gives the same bits as summing and then masking, so the result does
not depend on where the mask is applied. Likewise an op may hand back a parent's gradient as an
``AccumulatingGradient``, which adds itself into the gradient already there in its own kernel
instead of a separate ``ops.accumulate_``.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

from . import ops

__all__ = ["Tensor", "AccumulatingGradient", "no_grad", "is_grad_enabled"]

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


class AccumulatingGradient:
    """A parent's gradient that its op can add into the gradient already there in the same kernel
    (``ops.accumulate_`` fused), returned by a backward closure in place of an array.

    ``make(into)`` returns the gradient as a new array when ``into`` is None, else adds it into
    ``into`` in place and returns ``into``: the bits of ``accumulate_(into, gradient)``.
    """

    __slots__ = ("make",)

    def __init__(self, make: Callable[[object], object]):
        self.make = make


class Tensor:
    """An array (NumPy or CuPy) with an optional gradient and the op that produced it.

    ``data``: the value. ``grad``: the gradient of the output that ``backward`` started from
    (same shape, same backend), or None. Leaves are made by the user (parameters, inputs); other
    tensors by ops.
    """

    __slots__ = ("data", "grad", "requires_grad", "name", "relu_output", "_parents", "_backward",
                 "_masked", "_grad_masked")

    def __init__(self, data, requires_grad: bool = False, name: str = ""):
        self.data = data
        self.grad = None
        self.requires_grad = requires_grad
        self.name = name
        self.relu_output = False  # the output of an op that ends in a ReLU (data >= 0 or NaN)
        self._parents: tuple[Tensor, ...] = ()
        self._backward: BackwardFn | None = None
        self._masked: tuple[bool, ...] = ()  # per parent: its gradient comes back ReLU-masked
        self._grad_masked = False            # every contribution to self.grad came masked

    @classmethod
    def from_op(cls, data, parents: Sequence["Tensor"], backward: BackwardFn, name: str, *,
                relu: bool = False, masked: Sequence[bool] | None = None) -> "Tensor":
        """The output of an op. Records ``backward`` only if some parent needs a gradient.

        ``relu``: the op ends in a ReLU; ``backward`` is then handed the gradient after the ReLU's
        backward (the engine's, or the consumers' fused masks). ``masked``: one bool per parent,
        True where ``backward`` returns that parent's gradient already passed back through the
        parent's own ReLU (the op used ``parent.data`` as the ``relu_mask`` of its kernel); only
        a parent with ``relu_output`` and a recorded backward (not a leaf) may be marked.
        """
        needs_grad = _grad_enabled and any(p.requires_grad for p in parents)
        out = cls(data, requires_grad=needs_grad, name=name)
        out.relu_output = relu
        if needs_grad:
            out._parents = tuple(parents)
            out._backward = backward
            out._masked = tuple(bool(m) for m in masked) if masked is not None else (False,) * len(parents)
            if len(out._masked) != len(out._parents):
                raise ValueError(f"op {name}: {len(out._masked)} masked flags for {len(parents)} inputs")
            for parent, m in zip(out._parents, out._masked):
                if m and not (parent.relu_output and parent._backward is not None):
                    raise ValueError(f"op {name}: a gradient can be ReLU-masked only for an input "
                                     f"that a recorded op's ReLU made, not {parent!r}")
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
        self._grad_masked = False
        for node in reversed(self._topological_order()):
            if node._backward is None:
                continue
            grad = node.grad
            if node.relu_output and not node._grad_masked:
                grad = ops.relu_backward(node.data, grad)
            parent_grads = node._backward(grad)
            if len(parent_grads) != len(node._parents):
                raise RuntimeError(f"op {node.name} returned {len(parent_grads)} gradients for "
                                   f"{len(node._parents)} inputs")
            for parent, g, masked in zip(node._parents, parent_grads, node._masked):
                if g is None or not parent.requires_grad:
                    continue
                if parent.grad is None:
                    parent.grad = g.make(None) if isinstance(g, AccumulatingGradient) else g
                    parent._grad_masked = masked
                else:
                    if isinstance(g, AccumulatingGradient):
                        g.make(parent.grad)
                    else:
                        ops.accumulate_(parent.grad, g)
                    parent._grad_masked = parent._grad_masked and masked
            node.grad = None
            node._parents = ()
            node._backward = None
            node._masked = ()
