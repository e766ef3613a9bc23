"""A whole training step (forward, loss, backward, SGD update) captured once as a CUDA graph and
replayed every step after: ``python -m unet_cuda.train --cuda-graph``.

Why: one step of this U-Net launches a few hundred kernels (23 convolutions forward and backward,
pooling, concatenations, dropout, the loss, the parameter update), and Python prepares
each: autograd bookkeeping, the argument checks of the bindings, allocations. For small tiles the
GPU then waits on the host. A CUDA graph records the launches of one step once; each later step is
one ``cudaGraphLaunch`` of the same kernels with the same arguments. The plain Python path stays the
way to learn and to debug (every op can be stepped through and checked against the reference); this
one runs the very same kernels, so both give bitwise the same weights.

What a graph freezes, and what this module does about each of them:

1. **Every kernel argument is frozen at capture.** Pointers and scalars passed by value are replayed
   exactly as they were captured. Hence:

   * the batch is copied, every step, into static device buffers (image, labels, weights) whose
     addresses the graph holds; the copies run before the launch, outside the graph, because the
     sources are new arrays each step;
   * the two scalars that change every step live in device memory instead: the learning rate (the
     warm-up schedule raises it each step) is a 0-d float32 array, the dropout seeds (new masks each
     step) a uint64 array. ``sgd_momentum_update_multi_`` (the optimizer's update of all
     parameters; ``sgd_momentum_update_`` too) and the dropout ops (``dropout_seeded_forward`` and
     ``_backward``, which the network runs; ``dropout_mask`` too) accept such 0-d device arrays
     (docs/OPS.md) and their kernels read the value when they run, so each replay uses what
     the host wrote before it. The host draws them exactly as the eager step does
     (``Trainer.learning_rate``, ``UNet.draw_dropout_seeds``), which is why a graphed run and an
     eager run from the same seed end with bitwise-identical weights;
   * parameters and momentum buffers are updated in place at addresses the graph holds: they must
     not be replaced while the graph lives (``load_state_dict`` and ``UNet.to`` do replace them, so
     a resumed run builds a new graph). ``step`` checks this and refuses otherwise.

2. **Memory comes from a private pool.** Eagerly, every array an op allocates comes from CuPy's
   memory pool and returns to it when Python drops it; the next allocation may reuse it. During a
   capture no kernel runs: the graph records the addresses the allocations returned, and every
   replay writes there. When the capture ends, Python has dropped almost all of those arrays (the
   activations and intermediate gradients), so their pool counts that memory as free. Were it the
   pool everything else allocates from (augmentation, validation, the next batch), those arrays
   could be handed the same memory, and the next replay would overwrite them behind the program's
   back. So every allocation of the warm-up and of the capture comes from a
   ``cupy.cuda.MemoryPool`` of this object alone (``cupy.cuda.using_allocator(pool.malloc)``), no
   other code allocates from it, and it lives exactly as long as the graph. Within the step, memory
   freed and reused is fine: the capture is one stream, so the graph is a chain of kernels that
   replays in the order they were captured.

3. **The update reads the gradients of the same replay.** ``zero_grad()`` is part of the captured
   step, so backward allocates fresh gradient buffers (from the private pool) and the captured SGD
   update reads exactly those: each replay's update uses that replay's gradients. Had gradients of
   an earlier step still been attached, backward would have *accumulated* into them, and every
   replay would have added its gradients to all the previous ones. After the capture, each
   parameter's ``.grad`` is (and after every step is set again to) its buffer of the graph, so the
   trainer's non-finite check reads the gradients of the latest replay.

4. **A warm-up step comes first.** The first ``step`` runs the same code eagerly, on the same
   stream, static buffers, device scalars and private pool: the CUDA runtime loads each kernel at
   its first launch, and the pool grows to the step's peak, so the capture (at the second step)
   needs neither. It is a real training step whose update counts, not a throw-away one.

5. **Streams are ordered with events.** A capture cannot run on the legacy default stream, so the
   warm-up, the capture and every replay use one non-blocking stream of their own. Such a stream
   does not wait for the default stream, where the rest of the program works (augmentation,
   validation, checkpoints). ``step`` therefore makes the replay wait for the caller's stream (the
   batch is ready; no one still reads the weights) and the caller's stream wait for the replay
   (nothing reads the loss, the gradients or the weights before they are written).

6. **The non-finite guard comes after the update.** The eager trainer looks at the loss and the
   gradients before it updates, and skips the update of a bad step. Here the update is inside the
   graph, so when the host can look, the weights in memory have taken it. The trainer still names
   the step and the first bad layer and stops without saving, so the last checkpoint on disk stays
   the last good state.

A graph also keeps what it captured of the program's settings: the conv3x3 kernel version, the
batch shape, the dropout rate, momentum and weight decay. Changing one of them needs a new
``GraphedTrainStep``.
"""

from __future__ import annotations

import ctypes
from typing import Callable, Sequence

import numpy as np

from . import ops
from .autograd import Tensor
from .functional import softmax_cross_entropy
from .model import UNet
from .optim import SGD

__all__ = ["GraphedTrainStep"]


def _cupy():
    """CuPy, once the CUDA backend is known to work (else a clear CudaUnavailableError)."""
    why = ops.cuda_status()
    if why is not None:
        raise ops.CudaUnavailableError(f"a CUDA graph needs the CUDA backend, which cannot run here: {why}")
    import cupy  # noqa: PLC0415 - only where CUDA works

    return cupy


class GraphedTrainStep:
    """One training step of ``model`` with ``optimizer``, replayed as a CUDA graph.

    >>> step = GraphedTrainStep(model, optimizer, x_shape=(1, 1, 572, 572), labels_shape=(1, 388, 388))
    >>> loss = step(x, labels, weights, lr=0.001)   # 0-d CuPy array; float(loss) reads it

    The first call is the eager warm-up step, the second captures the graph and replays it, every
    later one replays it. Each call is one whole step of the eager trainer: the dropout seeds are
    drawn from ``model.dropout_rng``, the update uses rate ``lr``. ``loss_fn(logits, labels,
    weights)`` is the loss wiring of the trainer (weighted softmax cross-entropy by default).
    The module docstring explains what the graph freezes and why each precaution is needed.
    """

    def __init__(self, model: UNet, optimizer: SGD, x_shape: Sequence[int], labels_shape: Sequence[int],
                 weights_shape: Sequence[int] | None = None,
                 loss_fn: Callable[[Tensor, object, object], Tensor] = softmax_cross_entropy):
        cupy = _cupy()
        if model.device != "cuda":
            raise ValueError(f"GraphedTrainStep: the model must be on cuda, it is on {model.device}")
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.x_shape = tuple(int(s) for s in x_shape)
        self.labels_shape = tuple(int(s) for s in labels_shape)
        self.weights_shape = self.labels_shape if weights_shape is None else tuple(int(s) for s in weights_shape)
        self._cp = cupy
        # The pool and the stream of this graph alone (points 2 and 5 of the module docstring).
        self._pool = cupy.cuda.MemoryPool()
        self._stream = cupy.cuda.Stream(non_blocking=True)
        with self._stream, cupy.cuda.using_allocator(self._pool.malloc):
            self._x = cupy.zeros(self.x_shape, dtype=cupy.float32)
            self._labels = cupy.zeros(self.labels_shape, dtype=cupy.int32)
            self._weights = cupy.zeros(self.weights_shape, dtype=cupy.float32)
            self._lr = cupy.zeros((), dtype=cupy.float32)
            self._seeds = cupy.zeros((model.num_dropout_layers(),), dtype=cupy.uint64)
        # 0-d views, one per dropout layer: what the dropout kernels get instead of a seed value.
        self._seed_views = [self._seeds[i] for i in range(self._seeds.size)]
        self._graph = None
        self._loss = None          # the 0-d loss buffer the step writes
        self._grads: list = []     # the gradient buffers the step writes and its update reads
        self._bound: list = []     # the parameter and momentum arrays the step updates in place
        self.steps = 0

    @property
    def captured(self) -> bool:
        """True once the graph exists (from the second step on)."""
        return self._graph is not None

    def __call__(self, x, labels, weights, lr: float):
        return self.step(x, labels, weights, lr)

    # ------------------------------------------------------------------------------------- one step
    def step(self, x, labels, weights, lr: float):
        """One training step on this batch with learning rate ``lr``; returns the loss, a 0-d CuPy
        array of its own, ordered on the caller's stream (reading it waits for the step).

        The batch arrays may be CuPy or NumPy; they must have the shapes given at construction and
        float32 / int32 / float32 dtypes.
        """
        cupy = self._cp
        x = self._checked("x", x, self._x)
        labels = self._checked("labels", labels, self._labels)
        weights = self._checked("weights", weights, self._weights)
        self._check_state_unchanged()
        self.model.train()
        # Drawn on the host exactly as the eager forward draws them, then written to the device.
        host_seeds = np.asarray(self.model.draw_dropout_seeds(), dtype=np.uint64).reshape(self._seeds.shape)
        host_lr = np.asarray(lr, dtype=np.float32)   # the float32 rounding the eager kernel argument gets
        caller = cupy.cuda.get_current_stream()
        self._stream.wait_event(caller.record())     # the batch is ready; earlier readers are done
        with self._stream:
            cupy.copyto(self._x, x)
            cupy.copyto(self._labels, labels)
            cupy.copyto(self._weights, weights)
            self._write(self._lr, host_lr)
            self._write(self._seeds, host_seeds)
            if self.steps == 0:
                self._warm_up()
            else:
                if self._graph is None:
                    self._capture()
                self._graph.launch(self._stream)
        caller.wait_event(self._stream.record())     # nothing on the caller's stream runs before the step
        for p, g in zip(self.model.parameters(), self._grads):
            p.grad = g
        self.steps += 1
        return self._loss.copy()                     # the caller's own array, on the caller's stream

    # -------------------------------------------------------------------------------- the step body
    def _run_step(self):
        """Forward, loss, backward and update on the static buffers and the device scalars."""
        self.optimizer.zero_grad()  # backward allocates fresh gradients: point 3 of the module docstring
        logits = self.model(Tensor(self._x), dropout_seeds=self._seed_views)
        loss = self.loss_fn(logits, self._labels, self._weights)
        loss.backward()
        self.optimizer.step(lr=self._lr)
        return loss.data

    def _warm_up(self) -> None:
        with self._cp.cuda.using_allocator(self._pool.malloc):
            self._loss = self._run_step()
        self._remember_buffers()

    def _capture(self) -> None:
        cupy = self._cp
        # Drop the warm-up's gradients and loss (the trainer has checked them): back in the private
        # pool, the capture's allocations reuse that memory instead of growing the pool.
        self._grads, self._loss = [], None
        with cupy.cuda.using_allocator(self._pool.malloc):
            self._stream.begin_capture()
            try:
                loss = self._run_step()
            except BaseException:
                try:  # end the capture so the stream is usable again; the step's own error matters
                    self._stream.end_capture()
                except Exception:  # noqa: BLE001 - an invalidated capture ends with an error too
                    pass
                raise
            self._graph = self._stream.end_capture()
        self._loss = loss
        self._remember_buffers()

    def _remember_buffers(self) -> None:
        params = self.model.parameters()
        self._grads = [p.grad for p in params]
        self._bound = [p.data for p in params] + list(self.optimizer.velocity)

    # ------------------------------------------------------------------------------------- helpers
    def _write(self, dst, host: np.ndarray) -> None:
        """Copy ``host`` into ``dst`` in the order of this graph's stream.

        From pageable host memory, CUDA stages the bytes before the call returns, so ``host`` may be
        dropped at once; the copy itself runs in stream order, after the previous replay has read the
        old value and before the next one reads the new.
        """
        if host.nbytes:
            dst.data.copy_from_host_async(ctypes.c_void_p(host.ctypes.data), host.nbytes, self._stream)

    def _checked(self, name: str, a, buffer):
        cupy = self._cp
        if not isinstance(a, cupy.ndarray):
            a = cupy.asarray(np.asarray(a))  # on the caller's stream, before the event that orders it
        if a.shape != buffer.shape or a.dtype != buffer.dtype:
            raise ValueError(f"GraphedTrainStep: {name} must have shape {buffer.shape} and dtype {buffer.dtype} "
                             f"(the static buffer of the graph), got shape {a.shape} and dtype {a.dtype}")
        return a

    def _check_state_unchanged(self) -> None:
        if not self._bound:
            return
        current = [p.data for p in self.model.parameters()] + list(self.optimizer.velocity)
        if len(current) != len(self._bound) or any(a is not b for a, b in zip(current, self._bound)):
            raise RuntimeError("GraphedTrainStep: the parameters or the optimiser's momentum buffers were "
                               "replaced since the step was captured (load_state_dict? UNet.to?); the graph "
                               "would update the old arrays. Build a new GraphedTrainStep.")
