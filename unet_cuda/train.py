"""Train a U-Net the way the paper did: SGD with momentum 0.99, batch of one large tile, weighted
cross-entropy with the border weight map, elastic deformation, dropout.

    python -m unet_cuda.train                       # built-in EM-like data, GPU if there is one
    python -m unet_cuda.train --data ../shared/data/isbi2012 --out runs/isbi
    python -m unet_cuda.train --out runs/isbi --resume   # continue exactly where it stopped

Run with --help for every option.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from pathlib import Path

import numpy as np

from . import ops, sizes
from .cli import fail, restores_precision
from .augment import Augmenter
from .augment_gpu import GpuAugmenter
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint, write_atomically
from .data import DataError, load_dataset, split
from .functional import softmax_cross_entropy
from .inference import predict_image
from .metrics import evaluate
from .model import UNet
from .optim import SGD
from .tiling import TrainingTileSampler
from .weightmap import WeightMapCache

__all__ = ["main", "build_parser", "Trainer", "TrainingError", "NonFiniteError", "parameter_count"]

LAST_CHECKPOINT = "last.ckpt"
BEST_CHECKPOINT = "best.ckpt"

# The paper's network; on a CPU a reduced one, so that the no-argument run ends in a few minutes.
GPU_DEFAULTS = dict(base_channels=64, depth=5, tile=572, steps=4000, val_every=250)
CPU_DEFAULTS = dict(base_channels=16, depth=4, tile=188, steps=2000, val_every=500)
ARCHITECTURE_KEYS = ("in_channels", "num_classes", "base_channels", "depth", "dropout")
# What a resumable checkpoint's metadata must hold (written by Trainer.save), and its run configuration.
TRAINING_STATE_KEYS = ("step", "config", "rng", "history")
CONFIG_KEYS = ("data", "val_fraction", "augment", "in_channels", "num_classes", "dropout", "batch_size", "lr",
               "warmup_steps", "momentum", "weight_decay", "seed", "tta", "base_channels", "depth", "tile", "steps", "val_every",
               "checkpoint_every")
# Larger networks are refused before anything is allocated: 10^9 float32 parameters are 4 GB, and
# 12 GB with their gradients and momentum (the paper's network has 3.1e7). Without a bound a typo
# such as --depth 40 would try to allocate an astronomically large network, or search forever for
# a legal tile size.
MAX_PARAMETERS = 10**9


class TrainingError(RuntimeError):
    """Training cannot go on (the message says why and what to do)."""


class NonFiniteError(TrainingError):
    """The loss or a gradient stopped being finite."""


EPILOG = """
defaults
  With a GPU (and the built CUDA extension) the paper's network is trained: 64 base channels,
  depth 5, 572 px tiles (388 px output). Without one a reduced network is trained instead (16 base
  channels, depth 4, 188 px tiles, 2000 steps) so that the run ends in minutes; this is announced.
  Any option given explicitly wins over these defaults.

the loss
  Pixel-wise softmax + cross-entropy weighted by the paper's weight map
  (w = w_c + 10 exp(-(d1+d2)^2 / (2*5^2))), summed over pixels and divided by the pixel count.
  The learning rate (not given by the paper) defaults to 0.001 with momentum 0.99 (Caffe's rule:
  v = momentum v + lr grad; w = w - v), reached by a linear warm-up over --warmup-steps (200): at
  full rate from the first step, momentum 0.99 can switch off every ReLU of a fresh network.

outputs in --out
  last.ckpt            the latest checkpoint (weights, optimiser, step, RNG states, history),
                       written atomically every --checkpoint-every steps and at the end
  best.ckpt            the checkpoint with the lowest validation pixel error
  plans.json           with --autotune (or --plans): the GEMM plans run, with each checkpoint
                       (--plans FILE runs them again)
  history.json         loss per step and validation metrics
  training_curve.png   loss and validation metrics over the steps
  prediction.png       a validation image, its predicted probability and the errors
  Ctrl-C saves last.ckpt and stops; --resume continues bit-for-bit where it stopped.

examples
  python -m unet_cuda.train --device cpu --steps 50
  python -m unet_cuda.train --data ../shared/data/isbi2012 --out runs/isbi --steps 2000
  python -m unet_cuda.train --out runs/isbi --resume --steps 3000
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m unet_cuda.train",
        description="Train the U-Net of Ronneberger et al. (2015) on ISBI-style data or on the built-in "
                    "EM-like images.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--data", metavar="DIR", default=None,
                      help="dataset folder: ISBI layout (train-volume.tif + train-labels.tif) or images/ + "
                           "labels/ subfolders; default: the built-in synthetic EM-like dataset")
    data.add_argument("--val-fraction", type=float, default=0.2, metavar="F",
                      help="fraction of the images held out for validation (default 0.2)")
    data.add_argument("--no-augment", action="store_true", help="switch off elastic deformation, flips, "
                      "rotations and gray-value changes")
    model = p.add_argument_group("network")
    model.add_argument("--base-channels", type=int, default=None, metavar="N",
                       help="channels of the first level (paper: 64)")
    model.add_argument("--depth", type=int, default=None, metavar="N", help="resolution levels (paper: 5)")
    model.add_argument("--dropout", type=float, default=0.5, help="dropout at the two deepest levels (0.5)")
    model.add_argument("--tile", type=int, default=None, metavar="N",
                       help="input tile size; must be legal for the depth (paper: 572 -> 388 output)")
    train = p.add_argument_group("optimisation")
    train.add_argument("--steps", type=int, default=None, metavar="N",
                       help="total training steps (GPU default 4000, CPU default 2000)")
    train.add_argument("--batch-size", type=int, default=1, metavar="N", help="tiles per step (paper: 1)")
    train.add_argument("--lr", type=float, default=0.001, help="learning rate (default 0.001)")
    train.add_argument("--warmup-steps", type=int, default=200, metavar="N",
                       help="raise the learning rate linearly from 0 over the first N steps (default 200; 0: off)")
    train.add_argument("--momentum", type=float, default=0.99, help="SGD momentum (paper: 0.99)")
    train.add_argument("--weight-decay", type=float, default=0.0, help="L2 weight decay (default 0)")
    train.add_argument("--seed", type=int, default=0, help="seed for weights, tiles, augmentation, dropout")
    run = p.add_argument_group("running")
    run.add_argument("--device", choices=("cuda", "cpu"), default=None,
                     help="default: cuda when a GPU and the built extension are available, else cpu")
    run.add_argument("--precision", choices=ops.PRECISIONS, default=None,
                     help="what the 3x3 convolutions multiply in on the GPU: fp32 (CUDA cores), tf32 "
                          "(tensor cores, 10-bit mantissa; the GPU default) or bf16 (tensor cores, "
                          "7-bit mantissa); sums, weights and activations stay fp32. The CPU computes "
                          "in fp32 only")
    run.add_argument("--out", metavar="DIR", default="runs/train", help="output folder (default runs/train)")
    run.add_argument("--resume", nargs="?", const=True, default=False, metavar="CKPT",
                     help="continue from OUT/last.ckpt (or from CKPT); --steps may raise the total")
    run.add_argument("--val-every", type=int, default=None, metavar="N", help="validate every N steps")
    run.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                     help="write last.ckpt every N steps (default: as --val-every)")
    run.add_argument("--time-limit", type=float, default=None, metavar="MIN",
                     help="stop after the step that reaches MIN minutes (validated and saved; resumable)")
    run.add_argument("--tta", action="store_true", help="average validation predictions over 4 flips")
    run.add_argument("--no-plots", action="store_true", help="do not write the PNG figures")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--autotune", action="store_true",
                     help="GPU only: at its first call, time every block tile and K split that the "
                          "convolution kernel offers each GEMM (the 3x3 and 2x2 convolutions, every "
                          "direction) on this GPU and keep the fastest, as cudnn.benchmark does; by "
                          "default fixed rules choose them from the shapes. The first step takes some "
                          "seconds longer and results differ from the rules' in their last bits. The "
                          "plans chosen are kept in every checkpoint, which --resume runs with again "
                          "(timing only the GEMMs not met yet, as an unbroken run would), and written to "
                          "OUT/plans.json")
    run.add_argument("--plans", metavar="FILE", default=None,
                     help="GPU only: run the GEMM plans saved in FILE (the plans.json of an --autotune "
                          "run): the same plans, so the same bits, for GEMMs of the same shapes and "
                          "precision; with --resume they replace the checkpoint's")
    run.add_argument("--cuda-graph", action="store_true",
                     help="GPU only: capture one whole training step (forward, loss, backward, SGD update) "
                          "as a CUDA graph after one eager warm-up step, and replay it every step after "
                          "instead of launching each kernel from Python: the same kernels, so the same "
                          "weights bit for bit. The rate and the dropout seeds are written to the GPU each "
                          "step; a non-finite step is caught after its update, which is not saved. Resumed "
                          "runs capture anew. See unet_cuda/graph.py")
    return p


# ------------------------------------------------------------------------------------------------
def parameter_count(in_channels: int, num_classes: int, base_channels: int, depth: int) -> int:
    """Weights and biases of :class:`unet_cuda.model.UNet` with these settings, without building it
    (31,030,658 for the paper's network: 1 input channel, 2 classes, 64 base channels, depth 5)."""
    total = base_channels * num_classes + num_classes            # the final 1x1 convolution
    c_in = in_channels
    for level in range(depth):
        c = base_channels * 2 ** level
        total += 9 * c * (c_in + c) + 2 * c                      # two 3x3 convolutions going down
        if level < depth - 1:                                     # up-conv 2c -> c, two 3x3 convs
            total += 4 * (2 * c) * c + c + 9 * (2 * c) * c + c + 9 * c * c + c
        c_in = c
    return total


def choose_device(requested: str | None) -> str:
    try:
        return ops.choose_device(requested, hint="Use --device cpu to train on the CPU.")
    except ops.CudaUnavailableError as exc:
        raise TrainingError(str(exc)) from None


PLANS_FILE = "plans.json"


def apply_plan_options(args, cfg: dict) -> None:
    """--autotune and --plans: GPU options, refused on the CPU with the reason; a bad --plans file
    is refused before training starts."""
    if args.plans is not None:
        try:
            ops.load_tuned_plans(args.plans, cfg["device"])
        except ValueError as exc:
            raise TrainingError(f"--plans: {exc}") from None
    try:
        ops.set_autotune(args.autotune, cfg["device"])
    except ValueError as exc:
        raise TrainingError(f"--autotune: {exc}") from None


def check_cuda_graph(cfg: dict) -> None:
    """--cuda-graph replays CUDA kernels: a run on the CPU is refused with the reason."""
    if cfg["device"] != "cuda":
        why = ops.cuda_status()
        because = f" (CUDA cannot run here: {why})" if why else ""
        raise TrainingError(f"--cuda-graph captures the training step's CUDA kernels and needs the GPU, but this "
                            f"run is on the cpu{because}; drop --cuda-graph, or use --device cuda")


def resolve_config(args: argparse.Namespace) -> tuple[dict, list[str]]:
    """The run's configuration from the arguments and the device's defaults; and notes to print."""
    device = choose_device(args.device)
    defaults = GPU_DEFAULTS if device == "cuda" else CPU_DEFAULTS
    notes = []
    cfg = dict(device=device, data=args.data, val_fraction=args.val_fraction, augment=not args.no_augment,
               in_channels=1, num_classes=2, dropout=args.dropout, batch_size=args.batch_size, lr=args.lr,
               warmup_steps=args.warmup_steps, momentum=args.momentum, weight_decay=args.weight_decay, seed=args.seed, tta=args.tta)
    reduced = []
    for key in ("base_channels", "depth", "tile", "steps", "val_every"):
        value = getattr(args, key)
        if value is None:
            value = defaults[key]
            if device == "cpu" and key in ("base_channels", "depth", "tile", "steps"):
                reduced.append(f"{key.replace('_', '-')} {value}")
        cfg[key] = int(value)
    if reduced:
        notes.append("No GPU in use: training a reduced network so that this run ends in minutes ("
                     + ", ".join(reduced) + "). The paper's network is --base-channels 64 --depth 5 "
                     "--tile 572; pass options to override.")
    cfg["checkpoint_every"] = int(cfg["val_every"] if args.checkpoint_every is None else args.checkpoint_every)
    cfg["precision"] = args.precision or ops.default_precision(device)
    validate_config(cfg)
    return cfg, notes


def validate_config(cfg: dict) -> None:
    for key in ("base_channels", "depth", "steps", "batch_size", "val_every", "checkpoint_every"):
        if cfg[key] < 1:
            raise TrainingError(f"--{key.replace('_', '-')} must be >= 1, got {cfg[key]}")
    if not 0 < cfg["val_fraction"] < 1:
        raise TrainingError(f"--val-fraction must lie in (0, 1), got {cfg['val_fraction']}")
    if not 0 <= cfg["dropout"] < 1:
        raise TrainingError(f"--dropout must lie in [0, 1), got {cfg['dropout']}")
    if cfg["warmup_steps"] < 0:
        raise TrainingError(f"--warmup-steps must be >= 0, got {cfg['warmup_steps']}")
    if not (math.isfinite(cfg["lr"]) and cfg["lr"] > 0):
        raise TrainingError(f"--lr must be a positive number, got {cfg['lr']}")
    if not 0 <= cfg["momentum"] < 1:
        raise TrainingError(f"--momentum must lie in [0, 1), got {cfg['momentum']}")
    if not (math.isfinite(cfg["weight_decay"]) and cfg["weight_decay"] >= 0):
        raise TrainingError(f"--weight-decay must be >= 0, got {cfg['weight_decay']}")
    if cfg["device"] == "cpu" and cfg["precision"] != "fp32":
        raise TrainingError(f"--precision {cfg['precision']} runs on the GPU's tensor cores; the CPU "
                            "computes in fp32 only: use --device cuda, or --precision fp32")
    # depth > 30 is far beyond the bound at any width; checked first so that nothing loops long
    count = parameter_count(cfg["in_channels"], cfg["num_classes"], cfg["base_channels"], cfg["depth"]) \
        if cfg["depth"] <= 30 else math.inf
    if count > MAX_PARAMETERS:
        size = "more than 10^9" if count == math.inf else f"{count:,}"
        raise TrainingError(f"--depth {cfg['depth']} with --base-channels {cfg['base_channels']} makes a network "
                            f"of {size} parameters, above the limit of {MAX_PARAMETERS:,}; the paper's network "
                            "(--depth 5 --base-channels 64) has 31,030,658")
    try:
        sizes.plan(cfg["tile"], cfg["depth"])
    except sizes.IllegalSizeError as exc:
        raise TrainingError(f"--tile: {exc}") from None


# ------------------------------------------------------------------------------------------------
class Trainer:
    """One training run: data, model, optimiser, RNGs, history; steps, validation and checkpoints."""

    def __init__(self, cfg: dict, out_dir: Path, log=print, cuda_graph: bool = False, autotune: bool = False):
        self.cfg = cfg
        # --cuda-graph: a run option, not part of cfg (it changes how a step runs, not what it computes).
        self.cuda_graph = bool(cuda_graph)
        # --autotune: a run option too; kept in the checkpoints so that a resumed run times the GEMMs
        # it has not met yet, as the unbroken run would have
        self.autotune = bool(autotune)
        self.graphed_step = None  # unet_cuda.graph.GraphedTrainStep, built at the first step
        self.out_dir = Path(out_dir)
        self.log = log
        dataset = load_dataset(cfg["data"])
        if len(dataset) < 2:
            raise DataError(f"dataset {dataset.name!r} has {len(dataset)} image(s); training needs at least "
                            "2 (one is held out for validation)")
        self.train_set, self.val_set = split(dataset, val_fraction=cfg["val_fraction"], seed=cfg["seed"])
        self.dataset_name = dataset.name
        seed = cfg["seed"]
        ops.set_precision(cfg["precision"], cfg["device"])
        self.model = UNet(cfg["in_channels"], cfg["num_classes"], cfg["base_channels"], cfg["depth"],
                          cfg["dropout"], seed=seed, device=cfg["device"])
        self.optimizer = SGD(self.model.parameters(), cfg["lr"], cfg["momentum"], cfg["weight_decay"])
        # On the GPU the warp is our kernel (same random draws as the CPU's scipy warp).
        augmenter_class = GpuAugmenter if cfg["device"] == "cuda" else Augmenter
        self.augmenter = augmenter_class(seed=seed + 1) if cfg["augment"] else None
        self.sampler = TrainingTileSampler(self.train_set, cfg["tile"], cfg["depth"],
                                           np.random.default_rng([seed, 2]), augmenter=self.augmenter,
                                           weight_cache=WeightMapCache())
        self.step = 0
        self.history: dict = {"loss": [], "val": [], "seconds": 0.0}
        self.best_pixel_error = math.inf

    # -------------------------------------------------------------- state
    def rng_states(self) -> dict:
        return {"sampler": self.sampler.get_state(),
                "augmenter": self.augmenter.get_state() if self.augmenter is not None else None,
                "dropout": self.model.dropout_rng.bit_generator.state}

    def set_rng_states(self, states: dict) -> None:
        self.sampler.set_state(states["sampler"])
        if self.augmenter is not None and states.get("augmenter") is not None:
            self.augmenter.set_state(states["augmenter"])
        self.model.dropout_rng.bit_generator.state = states["dropout"]

    def save(self, name: str = LAST_CHECKPOINT) -> Path:
        meta = {"step": self.step, "config": self.cfg, "rng": self.rng_states(), "history": self.history,
                "best_pixel_error": self.best_pixel_error if math.isfinite(self.best_pixel_error) else None,
                "dataset": self.dataset_name,
                # the GEMM plans the GPU ran (measured ones, with --autotune or --plans): a resumed
                # run takes them again, so that it continues with the same bits
                "gemm_plans": ([{k: v for k, v in e.items() if k != "timed"} for e in ops.tuned_plans()]
                               if self.cfg["device"] == "cuda" else []),
                "autotune": self.autotune}
        path = save_checkpoint(self.out_dir / name, model_config=self.model.config,
                               model_state=self.model.state_dict(),
                               optimizer_state=self.optimizer.state_dict(), meta=meta)
        plans_file = self.out_dir / PLANS_FILE
        try:
            if meta["gemm_plans"]:  # measured plans (--autotune, --plans): also as a file for --plans
                ops.save_tuned_plans(plans_file)
            elif plans_file.exists():  # an earlier segment's, which these checkpoints no longer run
                plans_file.unlink()
        except OSError as exc:
            self.log(f"note: cannot write {plans_file} ({exc.strerror or exc}); the checkpoint {path.name} "
                     "holds the plans")
        return path

    def restore(self, checkpoint: dict) -> None:
        saved = checkpoint["model_config"]
        mine = self.model.config
        different = {k: (saved.get(k), mine[k]) for k in ARCHITECTURE_KEYS if saved.get(k) != mine[k]}
        if different:
            what = ", ".join(f"{k}: checkpoint {a} vs run {b}" for k, (a, b) in different.items())
            raise CheckpointError(f"the checkpoint is of another architecture ({what})")
        self.model.load_state_dict(checkpoint["model_state"])
        if checkpoint["optimizer_state"] is None:
            raise CheckpointError("the checkpoint holds no optimiser state; it cannot be resumed")
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        self.optimizer.lr = self.cfg["lr"]
        meta = checkpoint["meta"]
        self.step = int(meta["step"])
        self.set_rng_states(meta["rng"])
        self.history = meta["history"]
        self.best_pixel_error = meta.get("best_pixel_error") or math.inf
        plans = meta.get("gemm_plans") or []
        if plans and self.cfg["device"] != "cuda":
            self.log("note: the checkpoint's GEMM plans choose GPU kernels; this run on the CPU leaves them")
        elif plans:
            try:
                ops.set_tuned_plans(plans, self.cfg["device"])
            except ValueError as exc:
                self.log(f"note: the checkpoint's GEMM plans do not apply to this build ({exc}); the rules "
                         "plan instead, so results may differ in their last bits from an unbroken run")

    # -------------------------------------------------------------- one step
    def next_batch(self):
        tiles = [self.sampler.sample() for _ in range(self.cfg["batch_size"])]
        device = self.cfg["device"]
        xp = ops.array_module(tiles[0][0])  # CuPy when the tiles were augmented on the GPU
        x = ops.to_device(xp.stack([t[0] for t in tiles])[:, None], device)
        labels = ops.to_device(xp.stack([t[1] for t in tiles]), device)
        weights = ops.to_device(xp.stack([t[2] for t in tiles]), device)
        return x, labels, weights

    def train_step(self) -> float:
        x, labels, weights = self.next_batch()
        self.model.train()
        if self.cuda_graph:
            return self.graphed_train_step(x, labels, weights)
        loss = softmax_cross_entropy(self.model(x), labels, weights)
        self.optimizer.zero_grad()
        loss.backward()
        value = float(loss.data)
        bad = self.nonfinite_gradients()
        if not math.isfinite(value) or bad:
            raise NonFiniteError(self.describe_nonfinite(value, bad))
        self.optimizer.lr = self.learning_rate(self.step)
        self.optimizer.step()
        self.step += 1
        return value

    def graphed_train_step(self, x, labels, weights) -> float:
        """The step of ``train_step`` as a replay of a CUDA graph (``unet_cuda.graph``).

        The graph is built at the first step of this process, so after ``restore`` (which replaces the
        weights and the momentum buffers) a resumed run captures the restored ones. The rate and the
        dropout seeds are drawn as in the eager step, so the weights stay bitwise the same. The update
        is part of the graph: the non-finite check can only follow it, and stops the run unsaved.
        """
        if self.graphed_step is None:
            from .graph import GraphedTrainStep  # noqa: PLC0415 - CuPy only where it is used

            self.graphed_step = GraphedTrainStep(self.model, self.optimizer, x.shape, labels.shape, weights.shape,
                                                 loss_fn=softmax_cross_entropy)
        lr = self.learning_rate(self.step)
        value = float(self.graphed_step(x, labels, weights, lr))
        bad = self.nonfinite_gradients()
        if not math.isfinite(value) or bad:
            raise NonFiniteError(self.describe_nonfinite(value, bad, update_applied=True))
        self.optimizer.lr = lr
        self.step += 1
        return value

    def learning_rate(self, step: int) -> float:
        """The rate of update ``step + 1``: linear warm-up over ``warmup_steps``, then constant.

        With momentum 0.99 the first, large gradients of a freshly initialised network pile up
        in the velocity; at full rate they can push every ReLU of a layer below zero for good (a
        "dead" network that predicts one class). The warm-up (ours; the paper gives no schedule)
        keeps those first updates small.
        """
        warmup = self.cfg.get("warmup_steps", 0)
        return self.cfg["lr"] * min(1.0, (step + 1) / warmup) if warmup > 0 else self.cfg["lr"]

    def nonfinite_gradients(self) -> list[str]:
        """Names of the parameters whose gradient holds NaN or Inf (in forward order).

        Every step runs this, so it reads one flag per parameter back in a single transfer (on the
        GPU, one synchronisation per step rather than one per parameter).
        """
        named = [(name, p.grad) for name, p in self.model.named_parameters() if p.grad is not None]
        if not named:
            return []
        xp = ops.array_module(named[0][1])
        finite = ops.to_numpy(xp.stack([xp.isfinite(g).all() for _, g in named]))
        return [name for (name, _), ok in zip(named, finite) if not ok]

    def describe_nonfinite(self, loss: float, bad: list[str], update_applied: bool = False) -> str:
        step = self.step + 1
        if bad:
            where = f"non-finite gradients first in layer {bad[-1].rsplit('.', 1)[0]} (counting back from the " \
                    f"output; {len(bad)} parameter tensors affected: {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''})"
        else:
            where = "the loss itself (all gradients finite)"
        last = self.out_dir / LAST_CHECKPOINT
        kept = (f"The last good checkpoint ({last}) is intact" if last.exists()
                else "No checkpoint was written before it")
        update = ("the update ran inside the CUDA graph (--cuda-graph) and was not saved" if update_applied
                  else "the update was not applied")
        return (f"training stopped at step {step}: the loss is {loss} and {update}; "
                f"{where}. {kept}. Try a smaller --lr (now {self.cfg['lr']}) or check the input data for NaN/Inf.")

    # -------------------------------------------------------------- validation
    def validate(self) -> dict:
        metrics = []
        for image, labels in zip(self.val_set.images, self.val_set.instances):
            probs = predict_image(self.model, image, self.cfg["tile"], tta=self.cfg["tta"])
            metrics.append(evaluate(probs[1], labels))
        result = {k: float(np.mean([m[k] for m in metrics])) for k in metrics[0]}
        result["all_foreground_pixel_error"] = float(np.mean([1.0 - (lab > 0).mean()
                                                              for lab in self.val_set.labels]))
        result["step"] = self.step
        self.history["val"].append(result)
        return result

    # -------------------------------------------------------------- the loop
    def run(self, progress: bool = True, stop_requested=None, time_limit: float | None = None) -> dict:
        """Train up to ``cfg["steps"]``. ``stop_requested()`` is asked after every whole step (its
        validation and checkpoint included); when it says yes the loop ends early with
        ``"stopped": True``, so that the state saved afterwards resumes bit-for-bit.
        ``time_limit`` (seconds of this call): the step that reaches it is treated as the last
        one (validated and saved), and the run can be resumed later."""
        from tqdm import tqdm

        total = self.cfg["steps"]
        start_step, started = self.step, time.perf_counter()
        seconds_before = self.history.get("seconds", 0.0)
        bar = tqdm(total=total, initial=self.step, disable=not progress, unit="step", dynamic_ncols=True,
                   desc="training", file=sys.stderr)
        stopped = False
        try:
            while self.step < total:
                loss = self.train_step()
                self.history["loss"].append([self.step, loss])
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                out_of_time = time_limit is not None and time.perf_counter() - started >= time_limit
                last = self.step == total or out_of_time
                if self.step % self.cfg["val_every"] == 0 or last:
                    val = self.validate()
                    bar.write(f"step {self.step}: val pixel error {val['pixel_error']:.4f} "
                              f"(all-foreground {val['all_foreground_pixel_error']:.4f}), Rand error "
                              f"{val['rand_error']:.4f}, IoU {val['iou']:.4f}, Dice {val['dice']:.4f}")
                    if val["pixel_error"] < self.best_pixel_error:
                        self.best_pixel_error = val["pixel_error"]
                        self.history["seconds"] = seconds_before + time.perf_counter() - started
                        self.save(BEST_CHECKPOINT)
                if self.step % self.cfg["checkpoint_every"] == 0 or last:
                    self.history["seconds"] = seconds_before + time.perf_counter() - started
                    self.save()
                if stop_requested is not None and stop_requested() and self.step < total:
                    stopped = True
                    break
                if out_of_time:
                    break
        finally:
            bar.close()
        elapsed = time.perf_counter() - started
        self.history["seconds"] = seconds_before + elapsed
        return {"steps": self.step - start_step, "seconds": elapsed, "stopped": stopped}


# ------------------------------------------------------------------------------------------------
def _write_json_atomic(path: Path, obj) -> None:
    write_atomically(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def load_resume_checkpoint(args, out_dir: Path) -> dict:
    path = out_dir / LAST_CHECKPOINT if args.resume is True else Path(args.resume)
    checkpoint = load_checkpoint(path)
    meta = checkpoint["meta"]
    missing = [key for key in TRAINING_STATE_KEYS if key not in meta]
    if missing or not isinstance(meta["config"], dict):
        raise CheckpointError(f"checkpoint {path} holds no training state (missing: {', '.join(missing) or 'config'}); "
                              "only a checkpoint written by unet_cuda.train can be resumed")
    missing = [key for key in CONFIG_KEYS if key not in meta["config"]]
    if missing:
        raise CheckpointError(f"checkpoint {path} holds an incomplete training configuration (missing: "
                              f"{', '.join(missing)}); it cannot be resumed")
    return checkpoint


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out_dir = Path(args.out)

    try:
        if args.time_limit is not None and not (math.isfinite(args.time_limit) and args.time_limit > 0):
            raise TrainingError(f"--time-limit must be a positive number of minutes, got {args.time_limit}")
        checkpoint = None
        if args.resume:
            checkpoint = load_resume_checkpoint(args, out_dir)
            saved = checkpoint["meta"]["config"]
            # The run continues with its own configuration; only the step budget may change.
            for key in ("data", "base_channels", "depth", "tile"):
                given = getattr(args, key)
                if given is not None and given != saved[key]:
                    raise TrainingError(f"--resume: --{key.replace('_', '-')} {given} differs from the "
                                        f"checkpoint's {saved[key]}; a resumed run keeps its configuration")
            cfg = dict(saved)
            if args.steps is not None:
                cfg["steps"] = int(args.steps)
            if args.device is not None:
                cfg["device"] = choose_device(args.device)
            elif cfg.get("device") == "cuda" and ops.cuda_status() is not None:
                raise TrainingError(f"--resume: the run was trained on cuda, which cannot run here: "
                                    f"{ops.cuda_status()}. Add --device cpu to continue it on the CPU.")
            else:
                cfg["device"] = choose_device(cfg.get("device"))
            # A checkpoint from before the precision modes computed in fp32; a resumed run keeps
            # its precision unless --precision says otherwise (or the device has none but fp32).
            cfg["precision"] = args.precision or cfg.get("precision", "fp32")
            if cfg["device"] == "cpu" and args.precision is None:
                cfg["precision"] = "fp32"
            notes = [f"resuming from step {checkpoint['meta']['step']} of {cfg['steps']}"]
            if checkpoint["meta"].get("autotune") and cfg["device"] == "cuda" and not args.autotune:
                args.autotune = True  # the run was started with it: GEMMs not yet met are timed
                notes.append("--autotune: on, as the run was started (the checkpoint's plans are kept)")
            validate_config(cfg)
        else:
            cfg, notes = resolve_config(args)
        apply_plan_options(args, cfg)
        if args.autotune:
            notes.append("--autotune: the first call of each convolution times its plans; they are written "
                         f"to {out_dir / PLANS_FILE}")
        if args.cuda_graph:
            check_cuda_graph(cfg)
            notes.append("--cuda-graph: the first step of this run is the eager warm-up, the second captures the "
                         "training step as a CUDA graph, every later step replays it")
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrainingError(f"--out {out_dir}: cannot create the output folder ({exc.strerror})") from None
        for note in notes:
            print(note, file=sys.stderr)
        trainer = Trainer(cfg, out_dir, cuda_graph=args.cuda_graph, autotune=args.autotune)
        if checkpoint is not None:
            trainer.restore(checkpoint)
            if args.plans is not None:  # --plans wins over the checkpoint's plans
                ops.load_tuned_plans(args.plans, cfg["device"])
        model = trainer.model
        print(f"{model!r} on {cfg['device']} ({cfg['precision']}); data {trainer.dataset_name}: {len(trainer.train_set)} train / "
              f"{len(trainer.val_set)} val images; tile {cfg['tile']} -> {model.output_size(cfg['tile'])}",
              file=sys.stderr)
    except (TrainingError, DataError, CheckpointError, sizes.IllegalSizeError, ops.CudaUnavailableError) as exc:
        return fail(str(exc))

    # Ctrl-C or a polite kill (SIGTERM) lets the current step finish, then saves and stops: a
    # checkpoint taken between steps resumes bit-for-bit, one taken inside a step (tile drawn,
    # update half applied) would not. A second signal stops at once without saving.
    stop_signals: list[int] = []

    def on_stop_signal(signum, frame):
        stop_signals.append(signum)
        if len(stop_signals) > 1:
            raise KeyboardInterrupt

    previous = {s: signal.signal(s, on_stop_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        outcome = trainer.run(progress=not args.quiet, stop_requested=lambda: bool(stop_signals),
                              time_limit=None if args.time_limit is None else 60.0 * args.time_limit)
        interrupted = outcome["stopped"]
        if interrupted:
            path = trainer.save()
            print(f"\ninterrupted at step {trainer.step}: saved {path}; continue with "
                  f"python -m unet_cuda.train --out {out_dir} --resume", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"\nstopped at once during step {trainer.step + 1}; {out_dir / LAST_CHECKPOINT} holds the last "
              "checkpoint written before it", file=sys.stderr)
        return 130
    except NonFiniteError as exc:
        return fail(str(exc), code=3)
    except MemoryError:
        return fail(f"out of memory with --tile {cfg['tile']} and --batch-size {cfg['batch_size']}; "
                    "try a smaller tile or batch", code=4)
    except Exception as exc:  # GPU out-of-memory arrives as CuPy's own error class
        if ops.is_out_of_memory(exc):
            return fail(f"GPU out of memory with --tile {cfg['tile']} and --batch-size {cfg['batch_size']} "
                        f"({exc}); try a smaller --tile (e.g. {sizes.nearest_legal_input_sizes(cfg['tile'] // 2, cfg['depth'])[1]}) "
                        "or --batch-size 1", code=4)
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

    _write_json_atomic(out_dir / "history.json", trainer.history)
    if interrupted:
        return 130
    figures = []
    if not args.no_plots:
        from .plots import plot_prediction, plot_training_curve

        figures.append(plot_training_curve(trainer.history, out_dir / "training_curve.png"))
        image, labels = trainer.val_set.images[0], trainer.val_set.labels[0]
        probs = predict_image(trainer.model, image, cfg["tile"], tta=cfg["tta"])
        figures.append(plot_prediction(image, probs[1], labels, out_dir / "prediction.png"))
    val = trainer.history["val"][-1] if trainer.history["val"] else {}
    rate = outcome["steps"] / outcome["seconds"] if outcome["seconds"] > 0 else float("nan")
    summary = (f"trained {trainer.step} steps ({outcome['steps']} now, {rate:.2f} steps/s) on {cfg['device']}; "
               f"final loss {trainer.history['loss'][-1][1]:.4f}" if trainer.history["loss"] else "no steps run")
    if val:
        summary += (f"; val pixel error {val['pixel_error']:.4f} (all-foreground {val['all_foreground_pixel_error']:.4f}), "
                    f"Rand error {val['rand_error']:.4f}, IoU {val['iou']:.4f}, Dice {val['dice']:.4f}")
    summary += f"; checkpoint {out_dir / LAST_CHECKPOINT}"
    if figures:
        summary += "; figures " + ", ".join(str(f) for f in figures)
    print(summary)
    return 0


main = restores_precision(_main)


if __name__ == "__main__":
    sys.exit(main())
