"""Checkpoints: the model's weights, the optimiser's state, the step, every RNG state and the
training history, in one ``.ckpt`` file (a NumPy ``.npz`` archive with a JSON header).

Writing is atomic: the archive goes to a temporary file in the same folder, is flushed and
fsync'ed, then renamed over the old checkpoint (``os.replace``). A crash at any moment leaves either
the previous checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "write_atomically", "FORMAT_VERSION"]

FORMAT_VERSION = 1
_MODEL = "model/"
_VELOCITY = "velocity/"


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, corrupt, or of another architecture."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomically(path, write) -> Path:
    """Write a file so that a crash leaves the old file or the new one, never a torn one.

    ``write(f)`` fills a temporary file ``.NAME.PID.tmp`` beside ``path`` (binary mode); it is
    flushed and fsync'ed, renamed over ``path``, and the folder is fsync'ed. On any error the
    temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path


def save_checkpoint(path, *, model_config: dict, model_state: dict, optimizer_state: dict | None = None,
                    meta: dict | None = None) -> Path:
    """Write a checkpoint atomically. ``meta`` is any JSON-able dict (step, RNG states, history ...)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {_MODEL + name: np.asarray(value) for name, value in model_state.items()}
    header = {"format": FORMAT_VERSION, "model_config": model_config, "meta": meta or {},
              "parameter_names": list(model_state)}
    if optimizer_state is not None:
        velocity = optimizer_state["velocity"]
        arrays.update({f"{_VELOCITY}{i}": np.asarray(v) for i, v in enumerate(velocity)})
        header["optimizer"] = {k: v for k, v in optimizer_state.items() if k != "velocity"}
        header["optimizer"]["num_velocity"] = len(velocity)
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    write_atomically(path, lambda f: np.savez(f, **arrays))
    return path


def load_checkpoint(path) -> dict:
    """Read a checkpoint: ``{"model_config", "model_state", "optimizer_state" (or None), "meta"}``.

    Raises :class:`CheckpointError` with the path and the reason for anything that is not a whole
    checkpoint written by :func:`save_checkpoint`.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read ({exc.__class__.__name__}: {exc})") from None
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as archive:
            files = {name: archive[name] for name in archive.files}
    except (zipfile.BadZipFile, EOFError, ValueError, OSError, KeyError, NotImplementedError, RuntimeError) as exc:
        # Damaged bytes surface as any of these: NotImplementedError for a garbled compression
        # method, RuntimeError for a garbled "encrypted" flag, the others for the rest.
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt and cannot be read "
                              f"({exc.__class__.__name__}: {exc})") from None
    if "header" not in files:
        raise CheckpointError(f"checkpoint {path} has no header: it was not written by unet-cuda")
    try:
        header = json.loads(files["header"].tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path} has a corrupt header ({exc})") from None
    if header.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format {header.get('format')!r}; this version "
                              f"reads format {FORMAT_VERSION}")
    try:
        model_state = {name: files[_MODEL + name] for name in header["parameter_names"]}
        optimizer_state = None
        if "optimizer" in header:
            opt = dict(header["optimizer"])
            n = opt.pop("num_velocity")
            opt["velocity"] = [files[f"{_VELOCITY}{i}"] for i in range(n)]
            optimizer_state = opt
    except KeyError as exc:
        raise CheckpointError(f"checkpoint {path} is incomplete: {exc} is missing") from None
    return {"model_config": header["model_config"], "model_state": model_state,
            "optimizer_state": optimizer_state, "meta": header["meta"]}
