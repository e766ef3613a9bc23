"""Nothing lost and nothing silent: atomic checkpoints under SIGKILL, bit-identical --resume (also
after SIGTERM), the non-finite guard, out-of-memory and missing-CUDA messages, damaged checkpoints,
and wrong arguments to the ops.

Bad inputs checked here (numbered on from test_cli.py, which lists 1-61):
  62 a checkpoint cut short, at any of several lengths      -> CheckpointError "truncated or corrupt"
  63 a checkpoint with one flipped byte, at many places     -> CheckpointError, or the exact contents
  64 an empty checkpoint file                               -> "truncated or corrupt"
  65 a NumPy archive that is no checkpoint (no header)      -> "has no header"
  66 a checkpoint of an unknown format version              -> "has format 99"
  67 a checkpoint lacking one of its arrays                 -> "is incomplete"
  68 a folder where a checkpoint file is expected           -> "is not a file"
  69 a diverging run (--lr 1e30)                            -> exit 3, step and layer named
  70 a non-finite gradient in one layer                     -> exit 3, that layer named
  71 a non-finite step before any checkpoint was written    -> exit 3, says so
  72 GPU out of memory while training (CuPy's error class)  -> exit 4, a smaller legal tile suggested
  73 GPU out of memory while predicting                     -> exit 4, a smaller tile suggested
  74 host out of memory while training (MemoryError)        -> exit 4
  75 --device cuda where the CUDA extension is not built    -> exit 2 (train and predict)
  76 --resume of a GPU run where CUDA cannot run            -> exit 2, --device cpu suggested
  77-102 the 26 ``OP_CASES``: an op argument of the wrong rank, dtype, shape, size or type (not an
         array), a read-only array to an in-place op, an unknown device name
  103    an array moved to cuda where CUDA cannot run              -> CudaUnavailableError saying why
  104-107 the 4 ``NETWORK_CASES``: float64 input, wrong channel count, wrong rank, illegal tile size
Non-contiguous arrays are no error: the ops give the same result as for contiguous copies.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from unet_cuda import ops, predict, sizes, train
from unet_cuda.autograd import Tensor
from unet_cuda.checkpoint import CheckpointError, FORMAT_VERSION, load_checkpoint, save_checkpoint
from unet_cuda.model import UNet

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 120

TINY = ["--device", "cpu", "--base-channels", "2", "--depth", "2", "--tile", "36", "--no-plots", "--quiet"]


def tiny(out: Path, *extra) -> list[str]:
    return [*TINY, "--out", str(out), *extra]


def child_env() -> dict:
    paths = [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths))


def error_message(capsys) -> str:
    err = capsys.readouterr().err
    assert "error:" in err, err
    return err[err.index("error:"):]


def assert_same_checkpoint(a: dict, b: dict) -> None:
    """Bit for bit: every weight, every momentum buffer, the step, the RNG states, the loss history."""
    assert a["model_state"].keys() == b["model_state"].keys()
    for name in a["model_state"]:
        assert a["model_state"][name].tobytes() == b["model_state"][name].tobytes(), name
    va, vb = a["optimizer_state"]["velocity"], b["optimizer_state"]["velocity"]
    assert len(va) == len(vb) and all(x.tobytes() == y.tobytes() for x, y in zip(va, vb))
    assert a["meta"]["step"] == b["meta"]["step"]
    assert a["meta"]["rng"] == b["meta"]["rng"]
    assert a["meta"]["history"]["loss"] == b["meta"]["history"]["loss"]
    assert a["meta"]["history"]["val"] == b["meta"]["history"]["val"]


# --------------------------------------------------------------------------------------------------
# Atomic checkpoints
# --------------------------------------------------------------------------------------------------

# Run as a training process: np.savez is wrapped so that the second checkpoint write stalls after
# its first few kilobytes (and says so in a file) until the process is killed.
STALLING_TRAINER = r"""
import sys, time
from pathlib import Path
import numpy as np
from unet_cuda import train

ready, argv = Path(sys.argv[1]), sys.argv[2:]
real_savez, calls = np.savez, []


class StallingFile:
    def __init__(self, f):
        self.f, self.written = f, 0

    def write(self, data):
        count = self.f.write(data)
        self.written += len(data)
        if self.written > 2048:
            self.f.flush()
            ready.write_text(str(self.written))
            time.sleep(300)
        return count

    def __getattr__(self, name):
        return getattr(self.f, name)


def savez(file, *args, **kwargs):
    calls.append(file)
    return real_savez(StallingFile(file) if len(calls) == 2 else file, *args, **kwargs)


np.savez = savez
sys.exit(train.main(argv))
"""


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path):
    out, ready = tmp_path / "run", tmp_path / "ready"
    args = tiny(out, "--steps", "3", "--val-every", "100", "--checkpoint-every", "1")
    child = subprocess.Popen([sys.executable, "-c", STALLING_TRAINER, str(ready), *args], cwd=tmp_path,
                             env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert child.poll() is None, child.stderr.read().decode()
            assert time.monotonic() < deadline, "the child never reached the second checkpoint"
            time.sleep(0.02)
        before = (out / "last.ckpt").read_bytes()  # step 1, complete
        partial = list(out.glob(".last.ckpt.*.tmp"))
        assert len(partial) == 1 and 0 < partial[0].stat().st_size < len(before)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=30)
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    assert (out / "last.ckpt").read_bytes() == before
    checkpoint = load_checkpoint(out / "last.ckpt")
    assert checkpoint["meta"]["step"] == 1
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(partial[0])  # the torn write never replaced anything
    # And nothing is lost: resuming from it ends exactly where an unbroken run does.
    assert train.main(["--out", str(out), "--resume", "--quiet", "--no-plots"]) == 0
    assert train.main(tiny(tmp_path / "whole", "--steps", "3", "--val-every", "100", "--checkpoint-every", "1")) == 0
    assert_same_checkpoint(load_checkpoint(out / "last.ckpt"), load_checkpoint(tmp_path / "whole" / "last.ckpt"))


def test_failed_write_leaves_previous_checkpoint_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "m.ckpt"
    config = {"in_channels": 1}
    save_checkpoint(path, model_config=config, model_state={"w": np.arange(6, dtype=np.float32)}, meta={"step": 1})
    before = path.read_bytes()

    def disk_full(file, **arrays):
        file.write(b"PK\x03\x04 half an archive")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, model_config=config, model_state={"w": np.zeros(6, np.float32)}, meta={"step": 2})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ckpt"]
    assert load_checkpoint(path)["meta"] == {"step": 1}


# --------------------------------------------------------------------------------------------------
# Damaged checkpoints
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory) -> bytes:
    """The bytes of a whole checkpoint of a small network, with optimiser state and metadata."""
    net = UNet(1, 2, 2, 2, seed=3)
    path = tmp_path_factory.mktemp("reference") / "net.ckpt"
    velocity = [np.full_like(v, 0.25) for v in net.state_dict().values()]
    save_checkpoint(path, model_config=net.config, model_state=net.state_dict(),
                    optimizer_state={"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0, "velocity": velocity},
                    meta={"step": 7, "note": "reference"})
    return path.read_bytes()


@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.1, 0.5, 0.9, 0.999])
def test_truncated_checkpoint(tmp_path, checkpoint_bytes, fraction):
    path = tmp_path / "cut.ckpt"
    path.write_bytes(checkpoint_bytes[: int(len(checkpoint_bytes) * fraction)])
    with pytest.raises(CheckpointError, match=r"checkpoint .*cut\.ckpt is truncated or corrupt"):
        load_checkpoint(path)


def test_flipped_bytes_never_load_as_something_else(tmp_path, checkpoint_bytes):
    reference = tmp_path / "good.ckpt"
    reference.write_bytes(checkpoint_bytes)
    good = load_checkpoint(reference)
    rng = np.random.default_rng(0)
    refused = 0
    for position in rng.choice(len(checkpoint_bytes), size=150, replace=False):
        damaged = bytearray(checkpoint_bytes)
        damaged[position] ^= 0xFF
        path = tmp_path / "flipped.ckpt"
        path.write_bytes(bytes(damaged))
        try:
            loaded = load_checkpoint(path)
        except CheckpointError as exc:
            assert "flipped.ckpt" in str(exc)
            refused += 1
            continue
        # A byte that zip ignores (a timestamp, an attribute): then the contents must be exact.
        assert loaded["model_config"] == good["model_config"] and loaded["meta"] == good["meta"], position
        for name, value in good["model_state"].items():
            assert loaded["model_state"][name].tobytes() == value.tobytes(), (position, name)
    assert refused > 100


def test_checkpoint_that_is_not_one(tmp_path):
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.ckpt is truncated or corrupt"):
        load_checkpoint(tmp_path / "empty.ckpt")
    with open(tmp_path / "plain.ckpt", "wb") as f:
        np.savez(f, weights=np.ones(3))
    with pytest.raises(CheckpointError, match=r"plain\.ckpt has no header: it was not written by unet-cuda"):
        load_checkpoint(tmp_path / "plain.ckpt")
    (tmp_path / "folder.ckpt").mkdir()
    with pytest.raises(CheckpointError, match=r"folder\.ckpt is not a file"):
        load_checkpoint(tmp_path / "folder.ckpt")
    with pytest.raises(CheckpointError, match=r"absent\.ckpt does not exist"):
        load_checkpoint(tmp_path / "absent.ckpt")


def _rewrite_archive(source: bytes, path: Path, drop: str | None = None, header: dict | None = None) -> None:
    """Copy the members of a checkpoint archive into ``path``, leaving out ``drop`` or replacing the header."""
    with zipfile.ZipFile(io.BytesIO(source)) as original, zipfile.ZipFile(path, "w") as copy:
        for name in original.namelist():
            if name == drop:
                continue
            if name == "header.npy" and header is not None:
                buffer = io.BytesIO()
                np.save(buffer, np.frombuffer(json.dumps(header).encode(), dtype=np.uint8))
                copy.writestr(name, buffer.getvalue())
            else:
                copy.writestr(name, original.read(name))


def test_checkpoint_of_another_format_or_incomplete(tmp_path, checkpoint_bytes):
    with zipfile.ZipFile(io.BytesIO(checkpoint_bytes)) as archive:
        header = json.loads(np.load(io.BytesIO(archive.read("header.npy"))).tobytes().decode())
    _rewrite_archive(checkpoint_bytes, tmp_path / "future.ckpt", header=dict(header, format=99))
    expected = rf"future\.ckpt has format 99; this version reads format {FORMAT_VERSION}"
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(tmp_path / "future.ckpt")
    _rewrite_archive(checkpoint_bytes, tmp_path / "partial.ckpt", drop="model/up0.conv1.weight.npy")
    with pytest.raises(CheckpointError, match=r"partial\.ckpt is incomplete: 'model/up0\.conv1\.weight' is missing"):
        load_checkpoint(tmp_path / "partial.ckpt")
    _rewrite_archive(checkpoint_bytes, tmp_path / "whole.ckpt")
    assert load_checkpoint(tmp_path / "whole.ckpt")["meta"]["step"] == 7


# --------------------------------------------------------------------------------------------------
# --resume continues bit for bit
# --------------------------------------------------------------------------------------------------

def test_resume_is_bit_identical_to_an_unbroken_run(tmp_path):
    # augmentation and dropout (0.5 on both levels of a depth-2 network) on, as by default
    assert train.main(tiny(tmp_path / "whole", "--steps", "6", "--val-every", "3")) == 0
    assert train.main(tiny(tmp_path / "half", "--steps", "3", "--val-every", "3")) == 0
    assert train.main(["--out", str(tmp_path / "half"), "--resume", "--steps", "6", "--quiet", "--no-plots"]) == 0
    whole = load_checkpoint(tmp_path / "whole" / "last.ckpt")
    resumed = load_checkpoint(tmp_path / "half" / "last.ckpt")
    assert whole["meta"]["config"]["augment"] and whole["meta"]["config"]["dropout"] == 0.5
    assert [s for s, _ in resumed["meta"]["history"]["loss"]] == [1, 2, 3, 4, 5, 6]
    assert_same_checkpoint(whole, resumed)
    history = json.loads((tmp_path / "half" / "history.json").read_text())
    assert history["loss"] == whole["meta"]["history"]["loss"]


def test_sigterm_mid_run_then_resume_is_bit_identical(tmp_path):
    steps = "60"
    out = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-m", "unet_cuda.train",
                              *tiny(out, "--steps", steps, "--val-every", steps, "--checkpoint-every", "2")],
                             cwd=tmp_path, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.monotonic() + 60
        while not (out / "last.ckpt").exists():
            assert child.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
        time.sleep(0.05)  # somewhere inside a later step
        child.send_signal(signal.SIGTERM)
        _, stderr = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=30)
    assert child.returncode == 130, stderr
    assert "Traceback" not in stderr
    stopped_at = int(re.search(r"interrupted at step (\d+): saved .*last\.ckpt; continue with", stderr).group(1))
    assert 2 <= stopped_at < int(steps)
    assert load_checkpoint(out / "last.ckpt")["meta"]["step"] == stopped_at
    assert train.main(["--out", str(out), "--resume", "--quiet", "--no-plots"]) == 0
    assert train.main(tiny(tmp_path / "whole", "--steps", steps, "--val-every", steps, "--checkpoint-every", "2")) == 0
    assert_same_checkpoint(load_checkpoint(out / "last.ckpt"), load_checkpoint(tmp_path / "whole" / "last.ckpt"))


# --------------------------------------------------------------------------------------------------
# The non-finite guard
# --------------------------------------------------------------------------------------------------

def test_diverging_run_stops_naming_step_and_layer(tmp_path):
    result = subprocess.run([sys.executable, "-m", "unet_cuda.train",
                             *tiny(tmp_path / "run", "--steps", "20", "--val-every", "100", "--checkpoint-every", "1",
                                   "--lr", "1e30")],
                            cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    message = result.stderr[result.stderr.index("error:"):]
    stopped = re.search(r"training stopped at step (\d+): the loss is \S+ and the update was not applied", message)
    step = int(stopped.group(1))
    layer = re.search(r"non-finite gradients first in layer (\S+) ", message).group(1)
    names = {name.rsplit(".", 1)[0] for name, _ in UNet(1, 2, 2, 2).named_parameters()}
    assert layer in names
    assert f"The last good checkpoint ({tmp_path / 'run' / 'last.ckpt'}) is intact" in message
    assert "--lr (now 1e+30)" in message
    assert step >= 2
    checkpoint = load_checkpoint(tmp_path / "run" / "last.ckpt")
    assert checkpoint["meta"]["step"] == step - 1
    assert all(np.isfinite(v).all() for v in checkpoint["model_state"].values())
    assert all(np.isfinite(v).all() for v in checkpoint["optimizer_state"]["velocity"])


def _poison_gradient(monkeypatch, shape: tuple, at_call: int) -> None:
    """Make the weight gradient of the 3x3 convolution whose weights have ``shape`` infinite at its
    ``at_call``-th backward pass (= training step), everything else untouched."""
    real = ops.conv3x3_backward_weight
    calls = []

    def poisoned(x, dy):
        dw, db = real(x, dy)
        if dw.shape == shape:
            calls.append(1)
            if len(calls) == at_call:
                dw = dw.copy()
                dw.flat[5] = np.inf
        return dw, db

    monkeypatch.setattr(ops, "conv3x3_backward_weight", poisoned)


def test_nonfinite_gradient_names_its_layer_and_keeps_the_checkpoint(tmp_path, monkeypatch, capsys):
    # depth 2, 2 base channels: down1.conv2 is the only 3x3 convolution with 4 -> 4 channels
    _poison_gradient(monkeypatch, (4, 4, 3, 3), at_call=3)
    code = train.main(tiny(tmp_path / "run", "--steps", "5", "--val-every", "100", "--checkpoint-every", "1"))
    assert code == 3
    message = error_message(capsys)
    assert "training stopped at step 3:" in message
    assert "non-finite gradients first in layer down1.conv2 " in message
    assert "1 parameter tensors affected: down1.conv2.weight)" in message
    assert "is intact" in message
    checkpoint = load_checkpoint(tmp_path / "run" / "last.ckpt")
    assert checkpoint["meta"]["step"] == 2
    assert [s for s, _ in checkpoint["meta"]["history"]["loss"]] == [1, 2]
    # it resumes: the poisoned step is redone, now with a finite gradient
    monkeypatch.undo()
    assert train.main(["--out", str(tmp_path / "run"), "--resume", "--quiet", "--no-plots"]) == 0
    assert load_checkpoint(tmp_path / "run" / "last.ckpt")["meta"]["step"] == 5


def test_nonfinite_first_step_says_no_checkpoint_exists(tmp_path, monkeypatch, capsys):
    _poison_gradient(monkeypatch, (2, 1, 3, 3), at_call=1)  # down0.conv1
    assert train.main(tiny(tmp_path / "run", "--steps", "3", "--val-every", "100")) == 3
    message = error_message(capsys)
    assert "training stopped at step 1:" in message and "layer down0.conv1 " in message
    assert "No checkpoint was written before it" in message
    assert not (tmp_path / "run" / "last.ckpt").exists()


# --------------------------------------------------------------------------------------------------
# Out of memory, missing CUDA
# --------------------------------------------------------------------------------------------------

class OutOfMemoryError(Exception):
    """Named like cupy.cuda.memory.OutOfMemoryError, which is how a GPU allocation failure arrives."""


def test_gpu_out_of_memory_in_training_suggests_a_smaller_tile(tmp_path, monkeypatch, capsys):
    def no_memory(self):
        raise OutOfMemoryError("Out of memory allocating 2,147,483,648 bytes (allocated so far: 0 bytes).")

    monkeypatch.setattr(train.Trainer, "train_step", no_memory)
    assert train.main(tiny(tmp_path / "run", "--tile", "60", "--steps", "3")) == 4
    message = error_message(capsys)
    assert "GPU out of memory with --tile 60 and --batch-size 1" in message
    assert "allocating 2,147,483,648 bytes" in message
    suggested = int(re.search(r"try a smaller --tile \(e\.g\. (\d+)\)", message).group(1))
    assert suggested < 60 and sizes.is_legal_input_size(suggested, 2)


def test_out_of_memory_raised_by_our_launchers_is_recognised(tmp_path, monkeypatch, capsys):
    # A launcher's failed workspace allocation reaches Python as a RuntimeError naming the CUDA error.
    def no_memory(self):
        raise RuntimeError("conv3x3_backward_weight: cudaMallocAsync failed: out of memory")

    monkeypatch.setattr(train.Trainer, "train_step", no_memory)
    assert train.main(tiny(tmp_path / "run", "--tile", "60", "--steps", "3")) == 4
    assert "GPU out of memory with --tile 60" in error_message(capsys)


def test_host_out_of_memory_in_training(tmp_path, monkeypatch, capsys):
    def no_memory(self):
        raise MemoryError

    monkeypatch.setattr(train.Trainer, "train_step", no_memory)
    assert train.main(tiny(tmp_path / "run", "--steps", "3", "--batch-size", "2")) == 4
    assert "out of memory with --tile 36 and --batch-size 2; try a smaller tile or batch" in error_message(capsys)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """The output folder of a finished 3-step run."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    assert train.main(tiny(out, "--steps", "3", "--val-every", "3")) == 0
    return out


def test_gpu_out_of_memory_in_prediction(tmp_path, tiny_run, monkeypatch, capsys):
    import tifffile

    def no_memory(*args, **kwargs):
        raise OutOfMemoryError("Out of memory allocating 1,073,741,824 bytes")

    tifffile.imwrite(tmp_path / "in.tif", np.zeros((30, 30), np.uint8))
    monkeypatch.setattr(predict, "predict_image", no_memory)
    code = predict.main(["--checkpoint", str(tiny_run / "last.ckpt"), "--input", str(tmp_path / "in.tif"),
                         "--output", str(tmp_path / "out.tif"), "--quiet", "--batch-size", "4"])
    assert code == 4
    message = error_message(capsys)
    # the tile predict chose for a 30 x 30 image (at most the run's training tile, 36)
    from unet_cuda.tiling import inference_tile
    tile = inference_tile(30, 30, depth=2, max_tile=36)
    assert f"out of memory with --tile {tile} and --batch-size 4" in message
    assert "try a smaller --tile or --batch-size 1" in message
    assert not (tmp_path / "out.tif").exists()


NOT_BUILT = ("the CUDA extension unet_cuda._C is not built (No module named 'unet_cuda._C'); "
             "reinstall with a CUDA toolkit present: pip install -e .")


def test_device_cuda_without_the_extension(tmp_path, tiny_run, monkeypatch, capsys):
    monkeypatch.setattr(ops, "cuda_status", lambda: NOT_BUILT)
    assert train.main(tiny(tmp_path / "run", "--steps", "3") + ["--device", "cuda"]) == 2
    message = error_message(capsys)
    assert ("--device cuda was asked for but CUDA cannot run here: "
            "the CUDA extension unet_cuda._C is not built") in message
    assert "Use --device cpu" in message
    assert not (tmp_path / "run").exists()
    code = predict.main(["--checkpoint", str(tiny_run / "last.ckpt"), "--input", "unused.png",
                         "--output", str(tmp_path / "out.tif"), "--device", "cuda"])
    assert code == 2
    assert "CUDA cannot run here: the CUDA extension unet_cuda._C is not built" in error_message(capsys)


def test_device_cuda_without_cupy_or_gpu(tmp_path, capsys):
    why = ops.cuda_status()
    if why is None:
        pytest.skip("CUDA works here")
    assert train.main(tiny(tmp_path / "run", "--steps", "3") + ["--device", "cuda"]) == 2
    assert f"CUDA cannot run here: {why}" in error_message(capsys)


def test_resuming_a_gpu_run_where_cuda_cannot_run(tmp_path, tiny_run, monkeypatch, capsys):
    checkpoint = load_checkpoint(tiny_run / "last.ckpt")
    meta = dict(checkpoint["meta"], config=dict(checkpoint["meta"]["config"], device="cuda"))
    save_checkpoint(tmp_path / "run" / "last.ckpt", model_config=checkpoint["model_config"],
                    model_state=checkpoint["model_state"], optimizer_state=checkpoint["optimizer_state"], meta=meta)
    monkeypatch.setattr(ops, "cuda_status", lambda: "no CUDA device is visible")
    assert train.main(["--out", str(tmp_path / "run"), "--resume", "--steps", "4", "--quiet", "--no-plots"]) == 2
    message = error_message(capsys)
    assert "--resume: the run was trained on cuda, which cannot run here: no CUDA device is visible" in message
    assert "Add --device cpu" in message
    assert train.main(["--out", str(tmp_path / "run"), "--resume", "--steps", "4", "--device", "cpu",
                       "--quiet", "--no-plots"]) == 0
    assert load_checkpoint(tmp_path / "run" / "last.ckpt")["meta"]["step"] == 4


# --------------------------------------------------------------------------------------------------
# Wrong arguments to the ops (NumPy backend; the CUDA bindings have their own tests)
# --------------------------------------------------------------------------------------------------

def f32(*shape):
    return np.ones(shape, np.float32)


X, W, B = f32(1, 2, 8, 8), f32(4, 2, 3, 3), f32(4)

OP_CASES = [
    ("conv-x-rank", lambda: ops.conv3x3_forward(f32(2, 8, 8), W, B), ValueError,
     r"conv3x3_forward: x must be 4-d \[N,C,H,W\], got shape \(2, 8, 8\)"),
    ("conv-x-int", lambda: ops.conv3x3_forward(X.astype(np.int32), W, B), ValueError,
     r"conv3x3_forward: x must have a float dtype, got int32"),
    ("conv-w-channels", lambda: ops.conv3x3_forward(X, f32(4, 3, 3, 3), B), ValueError,
     r"conv3x3_forward: w has shape \(4, 3, 3, 3\) \(3 input channels\) but x has 2 channels"),
    ("conv-w-kernel", lambda: ops.conv3x3_forward(X, f32(4, 2, 2, 2), B), ValueError,
     r"conv3x3_forward: w must have shape \[O,C,3,3\], got \(4, 2, 2, 2\)"),
    ("conv-b-shape", lambda: ops.conv3x3_forward(X, W, f32(5)), ValueError,
     r"conv3x3_forward: b has shape \(5,\) but w has 4 output channels"),
    ("conv-x-too-small", lambda: ops.conv3x3_forward(f32(1, 2, 2, 9), W, B), ValueError,
     r"conv3x3_forward: x must be at least 3x3"),
    ("conv-x-list", lambda: ops.conv3x3_forward(X.tolist(), W, B), TypeError,
     r"expected a NumPy or CuPy array, got list"),
    ("conv-backward-weight-dy", lambda: ops.conv3x3_backward_weight(X, f32(1, 4, 5, 6)), ValueError,
     r"conv3x3_backward_weight: dy has shape \(1, 4, 5, 6\) but x has shape \(1, 2, 8, 8\)"),
    ("pool-odd", lambda: ops.maxpool2x2_forward(f32(1, 2, 7, 8)), ValueError,
     r"maxpool2x2_forward: x must have even H and W, got shape \(1, 2, 7, 8\)"),
    ("pool-argmax-float", lambda: ops.maxpool2x2_backward(f32(1, 2, 4, 4), f32(1, 2, 4, 4)), ValueError,
     r"maxpool2x2_backward: argmax"),
    ("upconv-dy-odd", lambda: ops.upconv2x2_backward_data(f32(1, 4, 7, 8), f32(4, 2, 2, 2)), ValueError,
     r"upconv2x2_backward_data: dy must have even H and W"),
    ("crop-skip-smaller", lambda: ops.crop_concat_forward(f32(1, 2, 8, 8), f32(1, 2, 6, 6)), ValueError,
     r"crop_concat_forward: skip \(6x6, shape \(1, 2, 6, 6\)\) is smaller than up \(8x8\)"),
    ("crop-odd-difference", lambda: ops.crop_concat_forward(f32(1, 2, 8, 8), f32(1, 2, 11, 12)), ValueError,
     r"crop_concat_forward: skip \(11x12.*cannot be centre-cropped to up \(8x8\): the size differences must be even"),
    ("crop-batch", lambda: ops.crop_concat_forward(f32(2, 2, 8, 8), f32(1, 2, 12, 12)), ValueError,
     r"crop_concat_forward: up has batch size 2 .* but skip has batch size 1"),
    ("crop-backward-shape", lambda: ops.crop_concat_backward(f32(1, 4, 8, 8), (1, 2, 12)), ValueError,
     r"crop_concat_backward: skip_shape must be 4 non-negative ints"),
    ("xent-labels-float", lambda: ops.softmax_xent_forward(f32(1, 2, 4, 4), f32(1, 4, 4), f32(1, 4, 4)), ValueError,
     r"softmax_xent_forward: labels must have an integer dtype, got float32"),
    ("xent-weights-shape", lambda: ops.softmax_xent_forward(f32(1, 2, 4, 4), np.zeros((1, 4, 4), np.int32),
                                                           f32(1, 4, 5)), ValueError,
     r"softmax_xent_forward: weights has shape \(1, 4, 5\) but logits has shape \(1, 2, 4, 4\)"),
    ("xent-dloss-array", lambda: ops.softmax_xent_backward(f32(1, 2, 4, 4), np.zeros((1, 4, 4), np.int32),
                                                          f32(1, 4, 4), dloss=np.ones(2)), ValueError,
     r"softmax_xent_backward: dloss must be a scalar or 0-d array, got shape \(2,\)"),
    ("dropout-mask-dtype", lambda: ops.dropout_forward(X, f32(1, 2, 8, 8), 0.5), ValueError,
     r"dropout_forward: mask must be uint8"),
    ("dropout-p-one", lambda: ops.dropout_mask((2, 3), 1.0, 7, like=X), ValueError,
     r"dropout_mask: p must be in \[0, 1\), got 1\.0"),
    ("dropout-seed-negative", lambda: ops.dropout_mask((2, 3), 0.5, -1, like=X), ValueError,
     r"dropout_mask: seed must be in \[0, 2\*\*64\), got -1"),
    ("dropout-like-list", lambda: ops.dropout_mask((2, 3), 0.5, 1, like=[1.0]), TypeError,
     r"expected a NumPy or CuPy array, got list"),
    ("accumulate-read-only", lambda: ops.accumulate_(np.broadcast_to(f32(3), (2, 3)), f32(2, 3)), ValueError,
     r"accumulate_: dst is updated in place but is read-only \(shape \(2, 3\)\)"),
    ("accumulate-shape", lambda: ops.accumulate_(f32(2, 3), f32(3, 2)), ValueError,
     r"accumulate_: dst has shape \(2, 3\) but src has shape \(3, 2\)"),
    ("sgd-velocity-int", lambda: ops.sgd_momentum_update_(f32(3), f32(3), np.zeros(3, np.int64), 0.1, 0.9, 0.0),
     ValueError, r"sgd_momentum_update_: velocity must have a float dtype, got int64"),
    ("to-device-name", lambda: ops.to_device(X, "tpu"), ValueError, r"device must be 'cpu' or 'cuda', got 'tpu'"),
]


@pytest.mark.parametrize("call, error, pattern", [c[1:] for c in OP_CASES], ids=[c[0] for c in OP_CASES])
def test_op_rejects_bad_argument(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


def test_to_cuda_without_cuda_is_a_clear_error():
    why = ops.cuda_status()
    if why is None:
        pytest.skip("CUDA works here")
    with pytest.raises(ops.CudaUnavailableError, match=re.escape(why)):
        ops.to_device(X, "cuda")


def test_non_contiguous_inputs_give_the_contiguous_result():
    rng = np.random.default_rng(0)
    big = rng.standard_normal((2, 6, 19, 21)).astype(np.float32)
    x = big[:, ::2, 1::2, ::2]                  # strided in every axis
    w = rng.standard_normal((3, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    assert not x.flags.c_contiguous
    np.testing.assert_array_equal(ops.conv3x3_forward(x, w, b), ops.conv3x3_forward(np.ascontiguousarray(x), w, b))
    xt = np.asfortranarray(big[:, :, :18, :20])
    np.testing.assert_array_equal(ops.maxpool2x2_forward(xt)[0], ops.maxpool2x2_forward(np.ascontiguousarray(xt))[0])


NETWORK_CASES = [
    ("float64-input", lambda net: net(Tensor(np.zeros((1, 1, 36, 36)))), ValueError,
     r"UNet: input must be float32 like the parameters, got float64"),
    ("channels", lambda net: net(Tensor(np.zeros((1, 3, 36, 36), np.float32))), ValueError,
     r"UNet: input must have shape \[N, 1, H, W\], got \(1, 3, 36, 36\)"),
    ("illegal-size", lambda net: net(Tensor(np.zeros((1, 1, 35, 36), np.float32))), sizes.IllegalSizeError,
     r"input size 35 is illegal for a U-Net of depth 2.*Nearest legal input sizes: 34 or 36"),
    ("rank", lambda net: net(Tensor(np.zeros((1, 36, 36), np.float32))), ValueError,
     r"UNet: input must have shape \[N, 1, H, W\], got \(1, 36, 36\)"),
]


@pytest.mark.parametrize("call, error, pattern", [c[1:] for c in NETWORK_CASES], ids=[c[0] for c in NETWORK_CASES])
def test_network_rejects_bad_input(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call(UNet(1, 2, 2, 2))
