"""Both command lines, run as separate processes the way a user runs them.

Successful runs: training on the built-in data (figures and summary line checked), on a small image
folder, on images smaller than one tile (mirrored), and on ISBI 2012 where the data is present;
prediction on a PNG, on a TIFF stack, with --mask, with --tta, to .png, on images smaller than one
tile. Every output is read back and its shape, dtype and value range checked.

Bad inputs. Each must end with exit code 2 (argparse's usage errors included), a line starting
with "error:" on stderr that says what is wrong and names the path, argument or shapes, and no
traceback. The cases (ids as in ``BAD_INPUTS`` below; more in test_reliability.py):

python -m unet_cuda.train
   1 data-missing            --data folder that does not exist
   2 data-is-file            --data names a file
   3 data-no-layout          a folder with neither train-volume.tif nor images/ + labels/
   4 data-empty-folders      images/ and labels/ without any image
   5 tiff-corrupt            an image file of random bytes with a .tif name
   6 tiff-empty              a zero-byte .tif (unreadable)
   7 tiff-truncated          a TIFF cut in the middle of its pixel data
   8 png-corrupt             a PNG signature followed by garbage
   9 label-missing           an image without a label file of the same name
  10 label-size              image and label of different sizes (image folder)
  11 image-sizes             images of different sizes in one folder
  12 isbi-counts             ISBI image and label stacks of different counts
  13 isbi-sizes              ISBI image and label stacks of different sizes
  14 isbi-labels-missing     train-volume.tif without train-labels.tif
  15 labels-fractional       labels that are neither binary nor instance labels (fractions)
  16 labels-negative         negative label values
  17 labels-nan              NaN in a label image
  18 image-nan               NaN in an input image
  19 image-inf               Inf in an input image
  20 stack-for-2d            a 3D stack in an image folder, where a 2D image is expected
  21 2d-for-stack            a 2D image as the ISBI volume, where a stack is expected
  22 image-color             a colour image whose channels differ
  23 image-complex           an image of an unsupported pixel type (complex64)
  24 one-image               a dataset of one image (nothing left to validate on)
  25 tile-illegal            --tile 35: the message names the nearest legal sizes 34 and 36
  26 tile-too-small          --tile 10: the message names the smallest legal size, 18
  27 steps-zero              --steps 0
  28 lr-nan                  --lr nan
  29 val-fraction            --val-fraction 1.5
  30 dropout-one             --dropout 1
  31 momentum-one            --momentum 1
  32 checkpoint-every-zero   --checkpoint-every 0
  33 depth-huge              --depth 40 (a network too large to build; must not hang)
  34 channels-huge           --base-channels 100000
  35 out-is-file             --out names an existing file
  36 steps-not-a-number      --steps abc (argparse)
  37 device-cuda             --device cuda on a machine without CUDA (skipped where CUDA works)
  38 resume-nothing          --resume where OUT holds no checkpoint
  39 resume-corrupt          --resume from a corrupt checkpoint
  40 resume-truncated        --resume from a truncated checkpoint
  41 resume-other-tile       --resume with a --tile other than the run's
  42 resume-other-arch       --resume with --base-channels of another architecture
  43 resume-weights-only     --resume from a checkpoint that holds no training state
python -m unet_cuda.predict
  44 ckpt-missing            --checkpoint that does not exist
  45 ckpt-truncated          a checkpoint cut in half
  46 ckpt-garbage            a checkpoint file of random bytes
  47 ckpt-other-arch         weights of another architecture than the checkpoint's record
  48 ckpt-arch-damaged       an architecture record of depth 40 (must not try to build it)
  49 ckpt-three-channels     a network for 3 input channels, given a grayscale image
  50 input-missing           --input that does not exist
  51 input-corrupt           --input TIFF of random bytes
  52 input-nan               --input with NaN
  53 input-5d                --input TIFF with 5 non-trivial dimensions
  54 input-color             --input colour PNG
  55 output-suffix           --output .jpg
  56 output-png-stack        --output .png for a stack
  57 output-under-file       --output inside a path that is a file
  58 predict-tile-illegal    --tile 35 (names 34 and 36)
  59 threshold               --threshold 2
  60 batch-size-zero         --batch-size 0
  61 predict-device-cuda     --device cuda on a machine without CUDA (skipped where CUDA works)
  62 precision-cpu           train --precision bf16 on the CPU (which computes in fp32 only)
  63 predict-precision-cpu   predict --precision tf32 on the CPU
  64 precision-unknown       --precision fp16 (argparse names the choices)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import tifffile
from PIL import Image

from unet_cuda import ops, sizes
from unet_cuda.checkpoint import load_checkpoint, save_checkpoint
from unet_cuda.model import UNet

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 120  # seconds for any one command; a tiny run takes 1-3 s

# A network of 434 parameters and 3 steps: every training run here takes a second or two.
DEPTH, TILE = 2, 36
TINY = ["--device", "cpu", "--base-channels", "2", "--depth", str(DEPTH), "--tile", str(TILE),
        "--steps", "3", "--val-every", "3", "--no-plots", "--quiet"]


def run_cli(module: str, args: list[str], cwd: Path, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """``python -m unet_cuda.<module> args`` in ``cwd``, with the checkout on the import path."""
    paths = [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    return subprocess.run([sys.executable, "-m", f"unet_cuda.{module}", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def assert_user_error(result: subprocess.CompletedProcess, *patterns: str, code: int = 2) -> None:
    """Exit ``code``, "error:" on stderr, each regex of ``patterns`` in that message, no traceback."""
    stderr = result.stderr
    assert "Traceback" not in stderr, stderr
    assert result.returncode == code, f"exit code {result.returncode}\n{stderr}"
    assert "error:" in stderr, stderr
    message = stderr[stderr.index("error:"):]
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not in {message!r}"


def cuda_works() -> bool:
    return ops.cuda_status() is None


# --------------------------------------------------------------------------------------------------
# Making inputs
# --------------------------------------------------------------------------------------------------

def random_image(rng, shape) -> np.ndarray:
    return (rng.random(shape) * 255).astype(np.uint8)


def random_labels(rng, shape) -> np.ndarray:
    return ((rng.random(shape) > 0.4) * 255).astype(np.uint8)


def write_stack(path: Path, stack: np.ndarray) -> None:
    """A multi-page TIFF; minisblack so that 3 or 4 pages are never taken for colour samples."""
    tifffile.imwrite(path, stack, photometric="minisblack")


def make_folder(root: Path, count: int = 3, size: int = 40, seed: int = 0) -> Path:
    """``root/images`` and ``root/labels`` with ``count`` 2D TIFF pairs ``im0.tif`` ... of ``size`` px."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(count):
        tifffile.imwrite(root / "images" / f"im{i}.tif", random_image(rng, (size, size)))
        tifffile.imwrite(root / "labels" / f"im{i}.tif", random_labels(rng, (size, size)))
    return root


def make_isbi(root: Path, count: int = 5, size: int = 40, label_shape=None, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    write_stack(root / "train-volume.tif", random_image(rng, (count, size, size)))
    write_stack(root / "train-labels.tif", random_labels(rng, label_shape or (count, size, size)))
    return root


# --------------------------------------------------------------------------------------------------
# One trained checkpoint for the prediction tests
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """``last.ckpt`` of a 3-step run on a small image folder."""
    root = tmp_path_factory.mktemp("trained")
    make_folder(root / "data", count=3, size=48)
    assert_ok(run_cli("train", [*TINY, "--data", "data", "--out", "run"], cwd=root))
    return root / "run" / "last.ckpt"


# --------------------------------------------------------------------------------------------------
# Training runs that succeed
# --------------------------------------------------------------------------------------------------

def test_train_on_builtin_data_writes_figures_and_summary(tmp_path):
    args = ["--device", "cpu", "--base-channels", "2", "--depth", str(DEPTH), "--tile", str(TILE),
            "--steps", "4", "--val-every", "2", "--out", "run"]  # plots on, progress bar on
    result = run_cli("train", args, cwd=tmp_path)
    assert_ok(result)
    assert "synthetic-em" in result.stderr  # the built-in data set was used
    summary = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(
        r"trained 4 steps \(4 now, [\d.]+ steps/s\) on cpu; final loss \d+\.\d{4}; "
        r"val pixel error [01]\.\d{4} \(all-foreground [01]\.\d{4}\), Rand error [01]\.\d{4}, "
        r"IoU [01]\.\d{4}, Dice [01]\.\d{4}; checkpoint run/last\.ckpt; "
        r"figures run/training_curve\.png, run/prediction\.png", summary), summary
    for name in ("training_curve.png", "prediction.png"):
        with Image.open(tmp_path / "run" / name) as figure:
            assert figure.format == "PNG"
            assert figure.width >= 200 and figure.height >= 100
    checkpoint = load_checkpoint(tmp_path / "run" / "last.ckpt")
    assert checkpoint["meta"]["step"] == 4
    assert [step for step, _ in checkpoint["meta"]["history"]["loss"]] == [1, 2, 3, 4]
    assert [v["step"] for v in checkpoint["meta"]["history"]["val"]] == [2, 4]
    assert (tmp_path / "run" / "best.ckpt").is_file() and (tmp_path / "run" / "history.json").is_file()


def test_train_precision_fp32_on_the_cpu_is_recorded(tmp_path):
    make_folder(tmp_path / "data", count=3, size=40)
    result = run_cli("train", [*TINY, "--data", "data", "--out", "run", "--precision", "fp32"], cwd=tmp_path)
    assert_ok(result)
    assert " on cpu (fp32); data " in result.stderr, result.stderr
    assert load_checkpoint(tmp_path / "run" / "last.ckpt")["meta"]["config"]["precision"] == "fp32"


def test_train_on_an_image_folder(tmp_path):
    make_folder(tmp_path / "data", count=4, size=44)
    result = run_cli("train", [*TINY, "--data", "data", "--out", "run"], cwd=tmp_path)
    assert_ok(result)
    assert "data data: 3 train / 1 val images" in result.stderr
    assert load_checkpoint(tmp_path / "run" / "last.ckpt")["meta"]["step"] == 3


def test_train_on_images_smaller_than_one_tile_mirrors_them(tmp_path):
    # 6x6 px images against a 36 px input tile (20 px output): the tiles are mirror-extrapolated.
    make_folder(tmp_path / "data", count=3, size=6)
    result = run_cli("train", [*TINY, "--data", "data", "--out", "run"], cwd=tmp_path)
    assert_ok(result)
    state = load_checkpoint(tmp_path / "run" / "last.ckpt")["model_state"]
    assert all(np.isfinite(v).all() for v in state.values())


def test_train_and_predict_on_isbi(tmp_path, isbi_dir):
    # depth 2, tile 132 -> 116 px output: 25 tiles per 512 px slice; one slice held out.
    args = ["--data", isbi_dir, "--device", "cpu", "--base-channels", "2", "--depth", "2", "--tile", "132",
            "--steps", "2", "--val-every", "2", "--val-fraction", "0.04", "--no-plots", "--quiet", "--out", "run"]
    result = run_cli("train", args, cwd=tmp_path)
    assert_ok(result)
    assert "24 train / 1 val images" in result.stderr
    assert re.search(r"trained 2 steps .* val pixel error 0\.\d{4}", result.stdout)
    test_volume = isbi_dir / "test-volume.tif"
    source = test_volume if test_volume.is_file() else isbi_dir / "train-volume.tif"
    slices = tifffile.imread(source)[:2]
    write_stack(tmp_path / "two.tif", slices)
    result = run_cli("predict", ["--checkpoint", "run/last.ckpt", "--input", "two.tif", "--output", "prob.tif",
                                 "--quiet"], cwd=tmp_path)
    assert_ok(result)
    prob = tifffile.imread(tmp_path / "prob.tif")
    assert prob.shape == (2, 512, 512) and prob.dtype == np.float32
    assert np.isfinite(prob).all() and prob.min() >= 0 and prob.max() <= 1


# --------------------------------------------------------------------------------------------------
# Prediction runs that succeed
# --------------------------------------------------------------------------------------------------

def predict(trained: Path, cwd: Path, *args) -> subprocess.CompletedProcess:
    result = run_cli("predict", ["--checkpoint", trained, "--quiet", *args], cwd=cwd)
    assert_ok(result)
    return result


def check_probabilities(array: np.ndarray, shape) -> None:
    assert array.shape == shape and array.dtype == np.float32
    assert np.isfinite(array).all() and array.min() >= 0.0 and array.max() <= 1.0


def test_predict_png_to_tiff_and_png(trained, tmp_path):
    rng = np.random.default_rng(1)
    Image.fromarray(random_image(rng, (50, 61))).save(tmp_path / "cells.png")
    result = predict(trained, tmp_path, "--input", "cells.png", "--output", "prob.tif", "--batch-size", "3")
    assert "wrote foreground probability of 1 image(s) of 50x61 px to prob.tif" in result.stdout
    # Without --tile the tile is chosen for the image: on the CPU at most the training tile (36).
    from unet_cuda.tiling import inference_tile
    chosen = inference_tile(50, 61, DEPTH, max_tile=TILE)
    assert chosen <= TILE and f"depth {DEPTH}, tile {chosen}, cpu" in result.stdout, result.stdout
    prob = tifffile.imread(tmp_path / "prob.tif")
    check_probabilities(prob, (50, 61))
    predict(trained, tmp_path, "--input", "cells.png", "--output", "prob.png")
    with Image.open(tmp_path / "prob.png") as png:
        scaled = np.array(png)
    assert scaled.shape == (50, 61) and scaled.dtype == np.uint8
    np.testing.assert_array_equal(scaled, np.clip(np.round(prob * 255), 0, 255).astype(np.uint8))
    predict(trained, tmp_path, "--input", "cells.png", "--output", "mask.png", "--mask")
    with Image.open(tmp_path / "mask.png") as png:
        mask = np.array(png)
    assert mask.shape == (50, 61) and mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, (prob > 0.5) * 255)


def test_predict_tiff_stack_probabilities_mask_and_tta(trained, tmp_path):
    rng = np.random.default_rng(2)
    write_stack(tmp_path / "stack.tif", random_image(rng, (3, 37, 45)))
    predict(trained, tmp_path, "--input", "stack.tif", "--output", "prob.tif")
    prob = tifffile.imread(tmp_path / "prob.tif")
    check_probabilities(prob, (3, 37, 45))

    result = predict(trained, tmp_path, "--input", "stack.tif", "--output", "mask.tiff", "--mask", "--threshold", "0.3")
    assert "wrote mask of 3 image(s)" in result.stdout
    mask = tifffile.imread(tmp_path / "mask.tiff")
    assert mask.shape == (3, 37, 45) and mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, (prob > 0.3) * 255)

    result = predict(trained, tmp_path, "--input", "stack.tif", "--output", "tta.tif", "--tta")
    assert "flip TTA" in result.stdout
    tta = tifffile.imread(tmp_path / "tta.tif")
    check_probabilities(tta, (3, 37, 45))
    # The flips of a whole image average the same four kinds of tile predictions: of one magnitude.
    assert np.abs(tta - prob).mean() < 0.5


@pytest.mark.parametrize("shape", [(1, 1), (5, 7)])
def test_predict_images_smaller_than_one_tile(trained, tmp_path, shape):
    tifffile.imwrite(tmp_path / "small.tif", np.random.default_rng(3).random(shape).astype(np.float32))
    predict(trained, tmp_path, "--input", "small.tif", "--output", "out.tif")
    check_probabilities(tifffile.imread(tmp_path / "out.tif"), shape)


# --------------------------------------------------------------------------------------------------
# Bad inputs: all run at once (they are independent), then checked one test each
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Bad:
    """One bad input: ``build(folder, checkpoint)`` writes what it needs into ``folder`` and returns
    the arguments of ``python -m unet_cuda.<module>``; ``patterns`` must all appear in the message."""

    id: str
    module: str
    build: Callable[[Path, Path], list]
    patterns: tuple[str, ...]
    without_cuda: bool = False


def train_on(folder_builder):
    def build(folder: Path, _ckpt: Path) -> list:
        folder_builder(folder)
        return [*TINY, "--data", "data", "--out", "run"]
    return build


def train_with(*extra):
    return lambda folder, _ckpt: [*TINY, "--out", "run", *extra]


def folder_with(change):
    """A valid 3-image folder in ``folder/data``, then ``change(data)``."""
    def build(folder: Path) -> None:
        data = make_folder(folder / "data")
        change(data)
    return build


def replace_image(name: str, array: np.ndarray, labels: bool = False):
    def change(data: Path) -> None:
        target = data / ("labels" if labels else "images") / name
        tifffile.imwrite(target, array, photometric="minisblack")
    return change


def add_pair(name: str, shape):
    """One more image and its label, both of ``shape``."""
    def change(data: Path) -> None:
        rng = np.random.default_rng(10)
        tifffile.imwrite(data / "images" / name, random_image(rng, shape))
        tifffile.imwrite(data / "labels" / name, random_labels(rng, shape))
    return change


def write_bytes(relative: str, content: bytes):
    def change(data: Path) -> None:
        (data / relative).write_bytes(content)
    return change


def truncate(relative: str):
    def change(data: Path) -> None:
        content = (data / relative).read_bytes()
        (data / relative).write_bytes(content[: len(content) // 2])
    return change


def swap_for_png(data: Path, png: bytes) -> None:
    (data / "images" / "im1.tif").unlink()
    (data / "images" / "im1.png").write_bytes(png)


def swap_for_color_png(data: Path) -> None:
    (data / "images" / "im1.tif").unlink()
    color_png(data / "images" / "im1.png")


def color_png(path: Path) -> None:
    rgb = np.zeros((40, 40, 3), np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).save(path)


def with_nonfinite(value):
    image = np.random.default_rng(4).random((40, 40)).astype(np.float32)
    image[7, 9] = value
    return image


def isbi(**kwargs):
    def build(folder: Path, _ckpt: Path) -> list:
        make_isbi(folder / "data", **kwargs)
        return [*TINY, "--data", "data", "--out", "run"]
    return build


def isbi_without_labels(folder: Path, _ckpt: Path) -> list:
    make_isbi(folder / "data")
    (folder / "data" / "train-labels.tif").unlink()
    return [*TINY, "--data", "data"]


def isbi_2d_volume(folder: Path, _ckpt: Path) -> list:
    make_isbi(folder / "data")
    tifffile.imwrite(folder / "data" / "train-volume.tif", random_image(np.random.default_rng(5), (40, 40)))
    return [*TINY, "--data", "data"]


def empty_folders(folder: Path, _ckpt: Path) -> list:
    (folder / "data" / "images").mkdir(parents=True)
    (folder / "data" / "labels").mkdir()
    return [*TINY, "--data", "data"]


def plain_folder(folder: Path, _ckpt: Path) -> list:
    (folder / "data").mkdir()
    (folder / "data" / "notes.txt").write_text("no images here")
    return [*TINY, "--data", "data"]


def data_is_file(folder: Path, _ckpt: Path) -> list:
    (folder / "data.tif").write_bytes(b"")
    return [*TINY, "--data", "data.tif"]


def out_is_file(folder: Path, _ckpt: Path) -> list:
    (folder / "run").write_text("a file, not a folder")
    return [*TINY, "--out", "run"]


def resume_from(write):
    """``--resume`` of the run in ``folder/run``, whose last.ckpt ``write(path, trained)`` provides."""
    def build(folder: Path, ckpt: Path) -> list:
        (folder / "run").mkdir()
        write(folder / "run" / "last.ckpt", ckpt)
        return ["--out", "run", "--resume", "--steps", "4", "--quiet"]
    return build


def copy_cut(path: Path, ckpt: Path) -> None:
    content = ckpt.read_bytes()
    path.write_bytes(content[: len(content) * 2 // 3])


def copy_corrupt(path: Path, ckpt: Path) -> None:
    content = bytearray(ckpt.read_bytes())
    middle = len(content) // 2
    content[middle: middle + 64] = bytes(b ^ 0xFF for b in content[middle: middle + 64])
    path.write_bytes(bytes(content))


def weights_only(path: Path, ckpt: Path) -> None:
    checkpoint = load_checkpoint(ckpt)
    save_checkpoint(path, model_config=checkpoint["model_config"], model_state=checkpoint["model_state"])


def resume_with(*extra):
    def build(folder: Path, ckpt: Path) -> list:
        (folder / "run").mkdir()
        (folder / "run" / "last.ckpt").write_bytes(ckpt.read_bytes())
        return ["--out", "run", "--resume", "--quiet", *extra]
    return build


def predict_args(*extra):
    """Predict with the trained checkpoint on a fine ``in.png``, then ``extra`` (which may override)."""
    def build(folder: Path, ckpt: Path) -> list:
        Image.fromarray(random_image(np.random.default_rng(6), (30, 30))).save(folder / "in.png")
        return ["--checkpoint", ckpt, "--input", "in.png", "--output", "out.tif", "--quiet", *extra]
    return build


def predict_on(write_input):
    def build(folder: Path, ckpt: Path) -> list:
        name = write_input(folder)
        return ["--checkpoint", ckpt, "--input", name, "--output", "out.tif", "--quiet"]
    return build


def predict_with_checkpoint(write):
    def build(folder: Path, ckpt: Path) -> list:
        Image.fromarray(random_image(np.random.default_rng(7), (30, 30))).save(folder / "in.png")
        write(folder / "model.ckpt", ckpt)
        return ["--checkpoint", "model.ckpt", "--input", "in.png", "--output", "out.tif", "--quiet"]
    return build


def other_architecture(path: Path, _ckpt: Path) -> None:
    # the record says depth 3, the weights are those of a depth-2 network
    net = UNet(1, 2, 2, 2)
    save_checkpoint(path, model_config=dict(net.config, depth=3), model_state=net.state_dict())


def damaged_architecture(path: Path, _ckpt: Path) -> None:
    net = UNet(1, 2, 2, 2)
    save_checkpoint(path, model_config=dict(net.config, depth=40, base_channels=64), model_state=net.state_dict())


def three_channels(path: Path, _ckpt: Path) -> None:
    net = UNet(3, 2, 2, 2)
    save_checkpoint(path, model_config=net.config, model_state=net.state_dict())


def garbage(path: Path, _ckpt: Path) -> None:
    path.write_bytes(np.random.default_rng(8).integers(0, 256, 5000, dtype=np.uint8).tobytes())


def nan_tiff(folder: Path) -> str:
    tifffile.imwrite(folder / "nan.tif", with_nonfinite(np.nan))
    return "nan.tif"


def five_d(folder: Path) -> str:
    tifffile.imwrite(folder / "5d.tif", np.zeros((2, 3, 2, 16, 16), np.float32))
    return "5d.tif"


def color_input(folder: Path) -> str:
    color_png(folder / "color.png")
    return "color.png"


def corrupt_input(folder: Path) -> str:
    (folder / "bad.tif").write_bytes(b"II*\x00" + bytes(range(256)) * 4)
    return "bad.tif"


def stack_to_png(folder: Path, ckpt: Path) -> list:
    write_stack(folder / "stack.tif", random_image(np.random.default_rng(9), (2, 30, 30)))
    return ["--checkpoint", ckpt, "--input", "stack.tif", "--output", "out.png", "--quiet"]


def output_under_file(folder: Path, ckpt: Path) -> list:
    (folder / "taken").write_text("a file")
    return predict_args("--output", "taken/out.tif")(folder, ckpt)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

BAD_INPUTS = [
    # ---- train: data
    Bad("data-missing", "train", train_with("--data", "nowhere"), (r"dataset folder not found: nowhere",)),
    Bad("data-is-file", "train", data_is_file, (r"dataset path is not a folder: data\.tif",)),
    Bad("data-no-layout", "train", plain_folder,
        (r"data is not a dataset folder", r"train-volume\.tif", r"images/ and labels/")),
    Bad("data-empty-folders", "train", empty_folders, (r"no \.tif/\.tiff/\.png images in data/images",)),
    Bad("tiff-corrupt", "train", train_on(folder_with(write_bytes("images/im1.tif", b"not a tiff at all" * 20))),
        (r"cannot read data/images/im1\.tif as a TIFF file",)),
    Bad("tiff-empty", "train", train_on(folder_with(write_bytes("labels/im2.tif", b""))),
        (r"cannot read data/labels/im2\.tif as a TIFF file",)),
    Bad("tiff-truncated", "train", train_on(folder_with(truncate("images/im0.tif"))),
        (r"cannot read data/images/im0\.tif as a TIFF file",)),
    Bad("png-corrupt", "train", train_on(folder_with(lambda d: swap_for_png(d, PNG_SIGNATURE + b"garbage" * 30))),
        (r"cannot read data/images/im1\.png as an image",)),
    Bad("label-missing", "train", train_on(folder_with(lambda d: (d / "labels" / "im2.tif").unlink())),
        (r"1 image\(s\) in data/images have no label file of the same name in data/labels: im2",)),
    Bad("label-size", "train",
        train_on(folder_with(replace_image("im1.tif", np.zeros((40, 38), np.uint8), labels=True))),
        (r"image and label sizes differ", r"data/images/im1\.tif has shape \(40, 40\)",
         r"data/labels/im1\.tif has shape \(40, 38\)")),
    Bad("image-sizes", "train", train_on(folder_with(add_pair("im9.tif", (32, 32)))),
        (r"images in data/images differ in size: im0\.tif has shape \(40, 40\), im9\.tif has shape \(32, 32\)",)),
    Bad("isbi-counts", "train", isbi(count=5, label_shape=(6, 40, 40)),
        (r"image and label counts differ", r"data/train-volume\.tif has shape \(5, 40, 40\)",
         r"data/train-labels\.tif has shape \(6, 40, 40\)")),
    Bad("isbi-sizes", "train", isbi(count=5, label_shape=(5, 40, 36)),
        (r"image and label sizes differ", r"\(5, 40, 40\)", r"\(5, 40, 36\)")),
    Bad("isbi-labels-missing", "train", isbi_without_labels,
        (r"ISBI training labels \(train-labels\.tif\) not found: data/train-labels\.tif",)),
    Bad("labels-fractional", "train",
        train_on(folder_with(replace_image("im0.tif", np.full((40, 40), 0.5, np.float32), labels=True))),
        (r"data/labels: labels contain non-integer values; expected binary or instance labels",)),
    Bad("labels-negative", "train",
        train_on(folder_with(replace_image("im0.tif", np.arange(-800, 800, dtype=np.int16).reshape(40, 40),
                                           labels=True))),
        (r"data/labels: labels contain negative values \(minimum -800\)",)),
    Bad("labels-nan", "train",
        train_on(folder_with(replace_image("im1.tif", np.where(np.eye(40) > 0, np.nan, 1).astype(np.float32),
                                           labels=True))),
        (r"data/labels: labels contain NaN or Inf",)),
    Bad("image-nan", "train", train_on(folder_with(replace_image("im0.tif", with_nonfinite(np.nan)))),
        (r"data/images/im0\.tif: image contains NaN or Inf",)),
    Bad("image-inf", "train", train_on(folder_with(replace_image("im2.tif", with_nonfinite(-np.inf)))),
        (r"data/images/im2\.tif: image contains NaN or Inf",)),
    Bad("stack-for-2d", "train",
        train_on(folder_with(replace_image("im1.tif", random_image(np.random.default_rng(0), (5, 40, 40))))),
        (r"data/images/im1\.tif: a stack of shape \(5, 40, 40\); expected a single 2D image",)),
    Bad("2d-for-stack", "train", isbi_2d_volume,
        (r"data/train-volume\.tif: a single 2D image of shape \(40, 40\); expected a \[n, H, W\] stack",)),
    Bad("image-color", "train", train_on(folder_with(swap_for_color_png)),
        (r"data/images/im1\.png: a color image with 3 channels that differ", r"expected grayscale")),
    Bad("image-complex", "train",
        train_on(folder_with(replace_image("im0.tif", np.ones((40, 40), np.complex64)))),
        (r"data/images/im0\.tif: unsupported pixel type complex64",)),
    Bad("one-image", "train", train_on(lambda f: make_folder(f / "data", count=1)),
        (r"dataset 'data' has 1 image\(s\); training needs at least 2",)),
    # ---- train: options
    Bad("tile-illegal", "train", train_with("--tile", "35"),
        (r"--tile: input size 35 is illegal for a U-Net of depth 2", r"odd size",
         r"Nearest legal input sizes: 34 or 36")),
    Bad("tile-too-small", "train", train_with("--tile", "10"),
        (r"--tile: input size 10 is illegal", r"Nearest legal input sizes: 18\.")),
    Bad("steps-zero", "train", train_with("--steps", "0"), (r"--steps must be >= 1, got 0",)),
    Bad("lr-nan", "train", train_with("--lr", "nan"), (r"--lr must be a positive number, got nan",)),
    Bad("val-fraction", "train", train_with("--val-fraction", "1.5"),
        (r"--val-fraction must lie in \(0, 1\), got 1\.5",)),
    Bad("dropout-one", "train", train_with("--dropout", "1"), (r"--dropout must lie in \[0, 1\), got 1\.0",)),
    Bad("momentum-one", "train", train_with("--momentum", "1"), (r"--momentum must lie in \[0, 1\), got 1\.0",)),
    Bad("checkpoint-every-zero", "train", train_with("--checkpoint-every", "0"),
        (r"--checkpoint-every must be >= 1, got 0",)),
    Bad("depth-huge", "train", train_with("--depth", "40"),
        (r"--depth 40 with --base-channels 2 makes a network of more than 10\^9 parameters",)),
    Bad("channels-huge", "train", train_with("--base-channels", "100000"),
        (r"--depth 2 with --base-channels 100000 makes a network of [\d,]+ parameters, above the limit",)),
    Bad("out-is-file", "train", out_is_file, (r"--out run: cannot create the output folder",)),
    Bad("steps-not-a-number", "train", train_with("--steps", "abc"), (r"argument --steps: invalid int value: 'abc'",)),
    Bad("device-cuda", "train", train_with("--device", "cuda"),
        (r"--device cuda was asked for but CUDA cannot run here: \S+", r"--device cpu"), without_cuda=True),
    # ---- train: resuming
    Bad("resume-nothing", "train", lambda f, c: ["--out", "run", "--resume"],
        (r"checkpoint run/last\.ckpt does not exist",)),
    Bad("resume-corrupt", "train", resume_from(copy_corrupt), (r"checkpoint run/last\.ckpt is truncated or corrupt",)),
    Bad("resume-truncated", "train", resume_from(copy_cut), (r"checkpoint run/last\.ckpt is truncated or corrupt",)),
    Bad("resume-other-tile", "train", resume_with("--tile", "40"),
        (r"--resume: --tile 40 differs from the checkpoint's 36",)),
    Bad("resume-other-arch", "train", resume_with("--base-channels", "4"),
        (r"--resume: --base-channels 4 differs from the checkpoint's 2",)),
    Bad("resume-weights-only", "train", resume_from(weights_only),
        (r"checkpoint run/last\.ckpt holds no training state \(missing: step, config, rng, history\)",)),
    # ---- predict
    Bad("ckpt-missing", "predict", predict_args("--checkpoint", "none.ckpt"),
        (r"checkpoint none\.ckpt does not exist",)),
    Bad("ckpt-truncated", "predict", predict_with_checkpoint(copy_cut),
        (r"checkpoint model\.ckpt is truncated or corrupt",)),
    Bad("ckpt-garbage", "predict", predict_with_checkpoint(garbage),
        (r"checkpoint model\.ckpt is truncated or corrupt",)),
    Bad("ckpt-other-arch", "predict", predict_with_checkpoint(other_architecture),
        (r"checkpoint model\.ckpt does not hold a loadable U-Net", r"depth 3", r"has 1,886 parameters but the file "
                                                                             r"stores 434 values")),
    Bad("ckpt-arch-damaged", "predict", predict_with_checkpoint(damaged_architecture),
        (r"checkpoint model\.ckpt does not hold a loadable U-Net", r"depth 40", r"more than 10\^18")),
    Bad("ckpt-three-channels", "predict", predict_with_checkpoint(three_channels),
        (r"checkpoint model\.ckpt holds a network for 3 input channels",)),
    Bad("input-missing", "predict", predict_args("--input", "none.png"), (r"image file not found: none\.png",)),
    Bad("input-corrupt", "predict", predict_on(corrupt_input), (r"cannot read bad\.tif as a TIFF file",)),
    Bad("input-nan", "predict", predict_on(nan_tiff), (r"nan\.tif: image contains NaN or Inf",)),
    Bad("input-5d", "predict", predict_on(five_d),
        (r"5d\.tif: array of shape \(2, 3, 2, 16, 16\); expected a 2D image or a \[n, H, W\] stack",)),
    Bad("input-color", "predict", predict_on(color_input), (r"color\.png: a color image with 3 channels",)),
    Bad("output-suffix", "predict", predict_args("--output", "out.jpg"),
        (r"--output out\.jpg: unsupported suffix '\.jpg'",)),
    Bad("output-png-stack", "predict", stack_to_png,
        (r"--output out\.png: a PNG holds one image, the input is a stack of 2",)),
    Bad("output-under-file", "predict", output_under_file, (r"--output taken/out\.tif: cannot write it",)),
    Bad("predict-tile-illegal", "predict", predict_args("--tile", "35"),
        (r"--tile: input size 35 is illegal", r"Nearest legal input sizes: 34 or 36")),
    Bad("threshold", "predict", predict_args("--threshold", "2"), (r"--threshold must lie in \(0, 1\), got 2\.0",)),
    Bad("batch-size-zero", "predict", predict_args("--batch-size", "0"), (r"--batch-size must be >= 1, got 0",)),
    Bad("predict-device-cuda", "predict", predict_args("--device", "cuda"),
        (r"--device cuda was asked for but CUDA cannot run here: \S+",), without_cuda=True),
    # ---- precision
    Bad("precision-cpu", "train", train_with("--precision", "bf16"),
        (r"--precision bf16 runs on the GPU's tensor cores; the CPU computes in fp32 only",)),
    Bad("predict-precision-cpu", "predict", predict_args("--device", "cpu", "--precision", "tf32"),
        (r"--precision: precision tf32 runs on the GPU's tensor cores", r"--precision fp32")),
    Bad("precision-unknown", "train", train_with("--precision", "fp16"),
        (r"argument --precision: invalid choice: 'fp16' \(choose from '?fp32'?, '?tf32'?, '?bf16'?\)",)),
]


@pytest.fixture(scope="module")
def bad_input_results(tmp_path_factory, trained) -> dict:
    """Every case of BAD_INPUTS run in its own folder, a few at a time; id -> CompletedProcess."""
    root = tmp_path_factory.mktemp("bad")
    jobs = {}
    for case in BAD_INPUTS:
        if case.without_cuda and cuda_works():
            continue
        folder = root / case.id
        folder.mkdir()
        jobs[case.id] = (case.module, case.build(folder, trained), folder)
    # Each run spends most of its second starting Python and importing; a few overlap well.
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {key: pool.submit(run_cli, module, args, folder) for key, (module, args, folder) in jobs.items()}
        return {key: future.result() for key, future in futures.items()}


def test_bad_input_ids_are_unique_and_at_least_thirty():
    ids = [case.id for case in BAD_INPUTS]
    assert len(ids) == len(set(ids)) and len(ids) >= 30


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[case.id for case in BAD_INPUTS])
def test_bad_input(case, bad_input_results):
    if case.without_cuda and cuda_works():
        pytest.skip("CUDA works here, so --device cuda is no error")
    result = bad_input_results[case.id]
    assert_user_error(result, *case.patterns)


def test_bad_tile_error_names_legal_sizes_only():
    # The sizes that the --tile messages above name really are the nearest legal ones.
    assert sizes.nearest_legal_input_sizes(35, DEPTH) == (34, 36)
    assert sizes.nearest_legal_input_sizes(10, DEPTH) == (None, 18)
    assert sizes.is_legal_input_size(TILE, DEPTH)


def test_time_limit_ends_the_run_after_a_validated_and_saved_step(tmp_path):
    from unet_cuda.checkpoint import load_checkpoint
    from unet_cuda.train import main

    out = tmp_path / "run"
    code = main(["--device", "cpu", "--base-channels", "2", "--depth", "2", "--tile", "36", "--steps", "50",
                 "--val-every", "50", "--no-plots", "--quiet", "--time-limit", "0.00001", "--out", str(out)])
    assert code == 0
    ckpt = load_checkpoint(out / "last.ckpt")
    assert ckpt["meta"]["step"] == 1
    assert [v["step"] for v in ckpt["meta"]["history"]["val"]] == [1]
    assert main(["--out", str(out), "--resume", "--quiet", "--no-plots", "--time-limit", "-1"]) == 2
