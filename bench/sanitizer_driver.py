"""Calls every op of ``unet_cuda.ops`` once on small, awkward shapes: the program compute-sanitizer
runs (memcheck, racecheck, initcheck, synccheck) in bench/gpu_check.sh.

    compute-sanitizer --tool memcheck python3 bench/sanitizer_driver.py
    python3 bench/sanitizer_driver.py --device cpu      # the same calls on the NumPy reference

Shapes are odd and not multiples of any tile (13x17 maps, 3 -> 5 channels, one case with 67 -> 65
channels for the tiled paths; one with 64 -> 32 and a concatenation of 32 + 32 channels, whose
multiples of 32 take the tap-major views of v4-v6 and their clamped addresses), so that every
bounds guard is exercised; each output's byte size is
no multiple of 512, so an overrun leaves its allocation. CuPy's memory pool is switched off (every
array is its own cudaMalloc): inside a pooled block an overrun lands in a neighbour's memory and
memcheck cannot see it. Inputs are drawn on the host with a fixed seed and copied over, so the run
is deterministic and runs no random-number kernels of its own.

On the GPU the 3x3 convolutions (plain and on a concatenation) and the up-convolutions run once
per kernel version of ``unet_cuda.ops.cuda.CONV3X3_VERSIONS``: each version is kernels of its own.

After each call the device is synchronised, so an error is reported at the op that caused it. A
call that raises is reported and the run goes on. The last line is
``SANITIZER DRIVER: <calls> calls, <failed> failed`` and the exit status is 1 when any call failed.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import traceback
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SUMMARY_PREFIX = "SANITIZER DRIVER:"


class Driver:
    def __init__(self, device: str, pool: bool):
        from unet_cuda import ops  # noqa: PLC0415

        self.ops = ops
        self.device = device
        self.rng = np.random.default_rng(0)
        self.calls = 0
        self.failed: list[str] = []
        if device == "cuda":
            why = ops.cuda_status()
            if why is not None:
                raise SystemExit(f"{SUMMARY_PREFIX} cannot run on the GPU: {why}")
            import cupy  # noqa: PLC0415

            if not pool:
                cupy.cuda.set_allocator(None)
                cupy.cuda.set_pinned_memory_allocator(None)
            self.xp = cupy
        else:
            self.xp = np

    # -------------------------------------------------------------- inputs
    def put(self, a: np.ndarray):
        return self.xp.asarray(np.ascontiguousarray(a)) if self.xp is not np else np.ascontiguousarray(a)

    def normal(self, *shape, std: float = 1.0):
        return self.put(self.rng.standard_normal(shape).astype(np.float32) * np.float32(std))

    def labels(self, *shape, k: int, illegal: bool = False):
        a = self.rng.integers(0, k, size=shape).astype(np.int32)
        if illegal:
            a.flat[::5] = -1
            a.flat[2::7] = k
        return self.put(a)

    def uniform(self, *shape, low: float = 0.0, high: float = 1.0):
        return self.put(self.rng.uniform(low, high, shape).astype(np.float32))

    def sync(self) -> None:
        if self.xp is not np:
            self.xp.cuda.Device().synchronize()

    # -------------------------------------------------------------- one call
    def call(self, name: str, fn: Callable[[], object]):
        self.calls += 1
        try:
            result = fn()
            self.sync()
        except Exception as exc:  # noqa: BLE001 - report every failure, keep going
            self.failed.append(name)
            print(f"FAILED {name}: {exc.__class__.__name__}: {exc}", flush=True)
            traceback.print_exc(limit=3)
            return None
        print(f"ok     {name}", flush=True)
        return result

    # -------------------------------------------------------------- the ops
    def conv3x3_versions(self) -> list[tuple[str, Callable]]:
        """(tag, context) per 3x3 convolution kernel version on the GPU; the reference once."""
        if self.device != "cuda":
            return [("", contextlib.nullcontext)]
        from unet_cuda.ops import cuda as cu  # noqa: PLC0415

        return [(f" [{v}]", lambda v=v: cu.use_conv3x3_version(v)) for v in cu.CONV3X3_VERSIONS
                if cu.conv3x3_version_available(v)]

    def convolutions(self) -> None:
        ops = self.ops
        # ... (1, 256, 70, 7, 8): 9C = 2304 columns, v6's 128 x 256 weight-gradient tile
        for n, c, o, h, w in ((2, 3, 5, 13, 17), (1, 1, 8, 9, 11), (1, 67, 65, 20, 19),
                              (1, 64, 32, 13, 17), (1, 256, 70, 7, 8)):
            x = self.normal(n, c, h, w)
            wt = self.normal(o, c, 3, 3, std=0.2)
            b = self.normal(o)
            dy = self.normal(n, o, h - 2, w - 2)
            y = None
            for version, using in self.conv3x3_versions():
                tag = f"{n}x{c}x{h}x{w}->{o}{version}"
                with using():
                    self.call(f"conv3x3_forward {tag}", lambda: ops.conv3x3_forward(x, wt, b, False))
                    y = self.call(f"conv3x3_forward relu {tag}", lambda: ops.conv3x3_forward(x, wt, b, True))
                    self.call(f"conv3x3_backward_data {tag}", lambda: ops.conv3x3_backward_data(dy, wt))
                    self.call(f"conv3x3_backward_data relu_mask {tag}",
                              lambda: ops.conv3x3_backward_data(dy, wt, relu_mask=x))
                    self.call(f"conv3x3_backward_weight {tag}", lambda: ops.conv3x3_backward_weight(x, dy))
            if y is not None:
                tag = f"{n}x{c}x{h}x{w}->{o}"
                self.call(f"relu_backward {tag}", lambda: ops.relu_backward(y, dy))
        # the convolution of [up, centre crop of skip]: odd maps, channels split unevenly
        for (n, cu, h, w), (cs, hs, ws), o in (((2, 3, 9, 11), (4, 13, 15), 5),
                                               ((1, 33, 12, 12), (34, 16, 18), 65),
                                               ((1, 32, 9, 11), (32, 13, 15), 32)):
            up, skip = self.normal(n, cu, h, w), self.normal(n, cs, hs, ws)
            wt = self.normal(o, cu + cs, 3, 3, std=0.2)
            b = self.normal(o)
            dy = self.normal(n, o, h - 2, w - 2)
            skip_shape = (n, cs, hs, ws)
            for version, using in self.conv3x3_versions():
                tag = f"up{[n, cu, h, w]} skip{list(skip_shape)}->{o}{version}"
                with using():
                    self.call(f"conv3x3_concat_forward relu {tag}",
                              lambda: ops.conv3x3_concat_forward(up, skip, wt, b, True))
                    self.call(f"conv3x3_concat_backward_data {tag}",
                              lambda: ops.conv3x3_concat_backward_data(dy, wt, skip_shape))
                    self.call(f"conv3x3_concat_backward_data relu masks {tag}",
                              lambda: ops.conv3x3_concat_backward_data(dy, wt, skip_shape, up_relu_mask=up,
                                                                       skip_relu_mask=skip))
                    self.call(f"conv3x3_concat_backward_weight {tag}",
                              lambda: ops.conv3x3_concat_backward_weight(up, skip, dy))
        # O = 9: v1; (3, 3, 2, 60, 61): the weight gradient in two slices, one ending inside an image
        for n, c, o, h, w in ((2, 5, 3, 7, 9), (1, 64, 2, 12, 13), (1, 3, 9, 5, 6), (3, 3, 2, 60, 61)):
            x = self.normal(n, c, h, w)
            wt = self.normal(o, c, 1, 1, std=0.3)
            b = self.normal(o)
            dy = self.normal(n, o, h, w)
            tag = f"{n}x{c}x{h}x{w}->{o}"
            self.call(f"conv1x1_forward {tag}", lambda: ops.conv1x1_forward(x, wt, b))
            self.call(f"conv1x1_backward_data {tag}", lambda: ops.conv1x1_backward_data(dy, wt))
            self.call(f"conv1x1_backward_data relu_mask {tag}",
                      lambda: ops.conv1x1_backward_data(dy, wt, relu_mask=x))
            self.call(f"conv1x1_backward_weight {tag}", lambda: ops.conv1x1_backward_weight(x, dy))
        for n, c, o, h, w in ((2, 6, 3, 5, 7), (1, 64, 33, 9, 9), (1, 8, 64, 6, 6)):  # 4O = 256: wide
            x = self.normal(n, c, h, w)
            wt = self.normal(o, c, 2, 2, std=0.3)
            b = self.normal(o)
            dy = self.normal(n, o, 2 * h, 2 * w)
            # the up-convolution follows the conv3x3 version: v3-v6 run it on their GEMM kernels
            for version, using in self.conv3x3_versions():
                tag = f"{n}x{c}x{h}x{w}->{o}{version}"
                with using():
                    self.call(f"upconv2x2_forward {tag}", lambda: ops.upconv2x2_forward(x, wt, b))
                    self.call(f"upconv2x2_backward_data {tag}", lambda: ops.upconv2x2_backward_data(dy, wt))
                    self.call(f"upconv2x2_backward_data relu_mask {tag}",
                              lambda: ops.upconv2x2_backward_data(dy, wt, relu_mask=x))
                    self.call(f"upconv2x2_backward_weight {tag}",
                              lambda: ops.upconv2x2_backward_weight(x, dy))

    def pooling_and_concat(self) -> None:
        ops = self.ops
        ties = self.put(np.ones((1, 2, 6, 6), np.float32))
        for tag, x in (("2x3x10x14", self.normal(2, 3, 10, 14)), ("ties 1x2x6x6", ties)):
            result = self.call(f"maxpool2x2_forward {tag}", lambda: ops.maxpool2x2_forward(x))
            if result is not None:
                y, argmax = result
                dy = self.normal(*y.shape)
                self.call(f"maxpool2x2_backward {tag}", lambda: ops.maxpool2x2_backward(dy, argmax))
                self.call(f"maxpool2x2_backward relu_mask {tag}",
                          lambda: ops.maxpool2x2_backward(dy, argmax, relu_mask=y))
                into = self.normal(*x.shape)
                self.call(f"maxpool2x2_backward accumulate {tag}",
                          lambda: ops.maxpool2x2_backward(dy, argmax, relu_mask=y, accumulate_into=into))
        for up_shape, skip_shape in (((2, 3, 6, 8), (2, 4, 10, 12)), ((1, 5, 7, 7), (1, 2, 7, 7))):
            up, skip = self.normal(*up_shape), self.normal(*skip_shape)
            n, cu, h, w = up_shape
            dy = self.normal(n, cu + skip_shape[1], h, w)
            tag = f"up{list(up_shape)} skip{list(skip_shape)}"
            self.call(f"crop_concat_forward {tag}", lambda: ops.crop_concat_forward(up, skip))
            self.call(f"crop_concat_backward {tag}", lambda: ops.crop_concat_backward(dy, skip_shape))

    def loss_and_elementwise(self) -> None:
        ops = self.ops
        for k, illegal in ((2, False), (3, True)):
            logits = self.normal(2, k, 7, 9, std=3.0)
            labels = self.labels(2, 7, 9, k=k, illegal=illegal)
            weights = self.uniform(2, 7, 9, low=0.5, high=10.0)
            tag = f"K={k}" + (" with illegal labels" if illegal else "")
            result = self.call(f"softmax_xent_forward {tag}",
                               lambda: ops.softmax_xent_forward(logits, labels, weights))
            if result is not None:
                probs = result[1]
                self.call(f"softmax_xent_backward {tag}",
                          lambda: ops.softmax_xent_backward(probs, labels, weights, 1.0))
        shape = (3, 5, 7, 11)
        x, dy = self.normal(*shape), self.normal(*shape)
        for p in (0.5, 0.0):
            mask = self.call(f"dropout_mask p={p}", lambda: ops.dropout_mask(shape, p, 2015, like=x))
            if mask is not None:
                self.call(f"dropout_forward p={p}", lambda: ops.dropout_forward(x, mask, p))
                self.call(f"dropout_backward p={p}", lambda: ops.dropout_backward(dy, mask, p))
            self.call(f"dropout_seeded_forward p={p}", lambda: ops.dropout_seeded_forward(x, p, 2015))
            self.call(f"dropout_seeded_backward p={p}", lambda: ops.dropout_seeded_backward(dy, p, 2015))
        dst, src = self.normal(1001), self.normal(1001)
        self.call("accumulate_ n=1001", lambda: ops.accumulate_(dst, src))
        param, grad, velocity = self.normal(1001), self.normal(1001), self.normal(1001, std=0.01)
        self.call("sgd_momentum_update_ n=1001",
                  lambda: ops.sgd_momentum_update_(param, grad, velocity, 0.01, 0.99, 5e-4))
        sizes = (1001, 7, 0) * 12  # 36 parameters: two launches of the multi-tensor kernel
        params = [self.normal(n) for n in sizes]
        grads = [self.normal(n) for n in sizes]
        velocities = [self.normal(n, std=0.01) for n in sizes]
        self.call("sgd_momentum_update_multi_ 36 parameters",
                  lambda: ops.sgd_momentum_update_multi_(params, grads, velocities, 0.01, 0.99, 5e-4))

    def augmentation(self) -> None:
        """The augmentation warp on odd, non-square and one-pixel windows, and with shifts far
        beyond the window (every tap mirrored); on the GPU also with non-finite nodes, which the
        kernel must survive without reading outside its inputs (the reference refuses them)."""
        ops = self.ops
        cases = [((13, 13), 3, 10.0, 1), ((17, 9), 3, 10.0, 2), ((1, 1), 1, 5.0, 3), ((7, 5), 2, 1e6, 0)]
        if self.device == "cuda":
            cases.append(((11, 11), 3, np.nan, 3))
        for (h, w), grid, sigma, turns in cases:
            image, weights = self.uniform(h, w, low=-0.1, high=1.1), self.uniform(h, w, low=1.0, high=11.0)
            labels = self.labels(h, w, k=3)
            nodes = self.rng.normal(0.0, 1.0, (2, grid, grid)) * sigma
            if np.isnan(sigma):
                nodes.flat[::2] = np.inf
            coarse = self.put(nodes.astype(np.float32))
            tag = f"{h}x{w} grid {grid} sigma {sigma} turns {turns}"
            self.call(f"augment_warp {tag}", lambda: ops.augment_warp(image, labels, weights, coarse, turns,
                                                                      True, False, 1.1, 0.9, 0.05))

    def network(self) -> None:
        """One training step and one prediction of a small U-Net: the ops wired as in training."""
        import unet_cuda as u  # noqa: PLC0415
        from unet_cuda import functional as F  # noqa: PLC0415

        net = u.UNet(base_channels=4, depth=3, seed=0, device=self.device)
        size = next(s for s in net.legal_input_sizes(200) if s >= 60)
        out = net.output_size(size)
        x = self.normal(1, 1, size, size)
        labels = self.labels(1, out, out, k=2)
        weights = self.uniform(1, out, out, low=0.5, high=10.0)
        opt = u.SGD(net.parameters(), lr=0.01, momentum=0.99)

        def train_step():
            loss = F.softmax_cross_entropy(net.train()(u.Tensor(x)), labels, weights)
            opt.zero_grad()
            loss.backward()
            opt.step()
            return loss

        def predict():
            with u.no_grad():
                return net.eval()(u.Tensor(x)).data

        self.call(f"UNet(depth=3, base=4) train step {size}->{out}", train_step)
        self.call(f"UNet(depth=3, base=4) prediction {size}->{out}", predict)

    def run(self) -> int:
        self.convolutions()
        self.pooling_and_concat()
        self.loss_and_elementwise()
        self.augmentation()
        self.network()
        print(f"{SUMMARY_PREFIX} {self.calls} calls, {len(self.failed)} failed"
              + (f" ({', '.join(self.failed)})" if self.failed else ""), flush=True)
        return 1 if self.failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda: our kernels (default); cpu: the NumPy reference, to check the driver itself")
    parser.add_argument("--pool", action="store_true",
                        help="keep CuPy's memory pool (faster, but hides overruns inside pooled blocks)")
    args = parser.parse_args(argv)
    return Driver(args.device, args.pool).run()


if __name__ == "__main__":
    sys.exit(main())
