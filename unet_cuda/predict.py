"""Segment images of any size with a trained U-Net, tile by tile (the paper's overlap-tile strategy).

    python -m unet_cuda.predict --checkpoint runs/train/last.ckpt --input image.tif --output prob.tif
    python -m unet_cuda.predict --checkpoint runs/isbi/best.ckpt --input test-volume.tif \\
        --output mask.tif --mask --tta

Run with --help for every option.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

from . import ops, sizes
from .cli import fail, restores_precision
from .checkpoint import CheckpointError, load_checkpoint
from .data import DataError, read_image
from .inference import predict_image
from .tiling import inference_tile
from .model import UNet

__all__ = ["main", "build_parser", "load_model"]

EPILOG = """
input and output
  --input takes a 2D image (TIFF or PNG) or a stack (multi-page TIFF); any size: the image is
  covered by output tiles, each predicted from a larger input tile, with the missing context at the
  borders mirrored (reflection without repeating the edge pixel).
  --output OUT.tif gets the foreground probability (class 1) as float32, one page per input image;
  with --mask it gets a uint8 mask (255 = foreground) thresholded at --threshold. A .png output
  (single images only) holds the probability scaled to 0..255, or the mask.

examples
  python -m unet_cuda.predict --checkpoint runs/train/last.ckpt --input cells.png --output cells-prob.tif
  python -m unet_cuda.predict --checkpoint runs/isbi/best.ckpt --input ../shared/data/isbi2012/test-volume.tif \\
      --output test-mask.tif --mask --tta --batch-size 4
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m unet_cuda.predict",
                                description="Predict foreground probabilities (or masks) with a trained U-Net.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="a .ckpt written by unet_cuda.train")
    p.add_argument("--input", required=True, metavar="IMAGE", help="2D image or stack (TIFF/PNG)")
    p.add_argument("--output", required=True, metavar="OUT", help="output file (.tif/.tiff, or .png for one image)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--tile", type=int, default=None, metavar="N",
                   help="input tile size. Default: chosen for the image size, the legal size that "
                        "computes the fewest pixels in all (every tile recomputes its context border), "
                        f"up to {GPU_MAX_TILE} px on a GPU and up to the training tile on the CPU")
    p.add_argument("--batch-size", type=int, default=1, metavar="N", help="tiles per forward pass (default 1)")
    p.add_argument("--tta", action="store_true", help="average over the 4 flips of each tile (4x the time)")
    p.add_argument("--mask", action="store_true", help="write a binary mask instead of probabilities")
    p.add_argument("--threshold", type=float, default=0.5, help="foreground threshold for --mask (0.5)")
    p.add_argument("--precision", choices=ops.PRECISIONS, default=None,
                   help="what the 3x3 convolutions multiply in on the GPU: fp32, tf32 (default there) "
                        "or bf16 (fastest; probabilities differ by about 1e-2 from fp32). The CPU "
                        "computes in fp32 only")
    p.add_argument("--autotune", action="store_true",
                   help="GPU only: time every block tile and K split of each convolution's GEMM at its "
                        "first call on this GPU and keep the fastest (as cudnn.benchmark does); pays "
                        "off over many tiles or images. Probabilities differ in their last bits")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _check_architecture(path, cfg, state: dict) -> None:
    """Refuse an architecture record that does not describe the stored weights, before the network is
    built: a damaged record (say depth 40) would otherwise ask for an enormous network."""
    from .train import parameter_count

    keys = ("in_channels", "num_classes", "base_channels", "depth")
    if not isinstance(cfg, dict) or not all(isinstance(cfg.get(k), int) and cfg[k] >= 1 for k in keys):
        raise CheckpointError(f"checkpoint {path} has a damaged architecture record: {cfg!r}")
    stored = sum(int(np.asarray(a).size) for a in state.values())
    # depth > 30 means more than 10^18 parameters at any width: no file holds that many
    needed = parameter_count(*(cfg[k] for k in keys)) if cfg["depth"] <= 30 else None
    if needed != stored:
        architecture = ", ".join(f"{k} {cfg[k]}" for k in keys)
        count = "more than 10^18" if needed is None else f"{needed:,}"
        raise CheckpointError(f"checkpoint {path} does not hold a loadable U-Net: its architecture ({architecture}) "
                              f"has {count} parameters but the file stores {stored:,} values")


def load_model(path, device: str) -> tuple[UNet, dict]:
    """The model stored in a checkpoint, on ``device``, in eval mode; and the checkpoint's metadata."""
    ckpt = load_checkpoint(path)
    cfg = ckpt["model_config"]
    _check_architecture(path, cfg, ckpt["model_state"])
    try:
        model = UNet(**cfg, device=device)
        model.load_state_dict(ckpt["model_state"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} does not hold a loadable U-Net: {exc}") from None
    return model.eval(), ckpt["meta"]


def write_output(path: Path, maps: np.ndarray, as_mask: bool, threshold: float, stacked: bool) -> None:
    """Write ``maps`` ([n, H, W] foreground probabilities) as TIFF or PNG."""
    suffix = path.suffix.lower()
    data = ((maps > threshold) * 255).astype(np.uint8) if as_mask else maps.astype(np.float32)
    if not stacked:
        data = data[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix in (".tif", ".tiff"):
        import tifffile

        tifffile.imwrite(path, data)
    elif suffix == ".png":
        if stacked:
            raise DataError(f"--output {path}: a PNG holds one image, the input is a stack of {len(maps)}; "
                            "write a .tif instead")
        from PIL import Image

        png = data if as_mask else np.clip(np.round(data * 255), 0, 255).astype(np.uint8)
        Image.fromarray(png).save(path)
    else:
        raise DataError(f"--output {path}: unsupported suffix {suffix!r}; use .tif, .tiff or .png")


# The largest tile the default choice takes on a GPU: one forward pass of the paper's network at
# 1052 px holds about 1.5 GB (the CPU keeps to the training tile).
GPU_MAX_TILE = 1052


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    output = Path(args.output)
    if output.suffix.lower() not in (".tif", ".tiff", ".png"):
        return fail(f"--output {output}: unsupported suffix {output.suffix!r}; use .tif, .tiff or .png")
    if args.batch_size < 1:
        return fail(f"--batch-size must be >= 1, got {args.batch_size}")
    if not 0 < args.threshold < 1 or not math.isfinite(args.threshold):
        return fail(f"--threshold must lie in (0, 1), got {args.threshold}")
    try:
        device = ops.choose_device(args.device)
        precision = args.precision or ops.default_precision(device)
        try:
            ops.set_precision(precision, device)
        except ValueError as exc:
            return fail(f"--precision: {exc}")
        try:
            ops.set_autotune(args.autotune, device)
        except ValueError as exc:
            return fail(f"--autotune: {exc}")
        model, meta = load_model(args.checkpoint, device)
        if model.config["in_channels"] != 1:
            raise CheckpointError(f"checkpoint {args.checkpoint} holds a network for {model.config['in_channels']} "
                                  "input channels; this tool reads grayscale images (1 channel)")
        if args.tile is not None:
            try:
                sizes.plan(args.tile, model.depth)
            except sizes.IllegalSizeError as exc:
                return fail(f"--tile: {exc}")
        images = read_image(args.input)
        if args.tile is not None:
            tile = args.tile
        else:
            max_tile = GPU_MAX_TILE if device == "cuda" else int(meta.get("config", {}).get("tile", 572))
            max_tile = max(max_tile, sizes.input_size_for_output(1, model.depth))  # at least one legal size
            tile = inference_tile(images.shape[-2], images.shape[-1], model.depth, max_tile)
    except (CheckpointError, DataError, sizes.IllegalSizeError, ops.CudaUnavailableError) as exc:
        return fail(str(exc))
    stacked = images.ndim == 3
    stack = images if stacked else images[None]
    from tqdm import tqdm

    bar = tqdm(total=None, disable=args.quiet, unit="tile", desc="predicting", file=sys.stderr)
    done_before = 0

    def progress(done: int, total: int) -> None:
        if bar.total is None:
            bar.total = total * len(stack)
        bar.n = done_before + done
        bar.refresh()

    maps = np.empty(stack.shape, np.float32)
    try:
        for i, image in enumerate(stack):
            probs = predict_image(model, image, tile, batch_size=args.batch_size, tta=args.tta, progress=progress)
            maps[i] = probs[1]
            done_before = bar.n
    except Exception as exc:
        if ops.is_out_of_memory(exc) or isinstance(exc, MemoryError):
            return fail(f"out of memory with --tile {tile} and --batch-size {args.batch_size} ({exc}); "
                        "try a smaller --tile or --batch-size 1", code=4)
        raise
    finally:
        bar.close()
    try:
        write_output(output, maps, args.mask, args.threshold, stacked)
    except DataError as exc:
        return fail(str(exc))
    except OSError as exc:
        return fail(f"--output {output}: cannot write it ({exc.strerror or exc})")
    what = "mask" if args.mask else "foreground probability"
    print(f"wrote {what} of {len(stack)} image(s) of {stack.shape[1]}x{stack.shape[2]} px to {output} "
          f"({model.config['base_channels']} base channels, depth {model.depth}, tile {tile}, {device}, "
          f"{precision}{', flip TTA' if args.tta else ''})")
    return 0


main = restores_precision(_main)


if __name__ == "__main__":
    sys.exit(main())
