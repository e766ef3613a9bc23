"""Figures a person would rather look at than read: the training curve and a prediction overlay."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["plot_training_curve", "plot_prediction"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if len(values) < window or window < 2:
        return values
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid")


def plot_training_curve(history: dict, path) -> Path:
    """Loss per step (raw and a moving average) and the validation errors over the steps."""
    plt = _pyplot()
    path = Path(path)
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    if history.get("loss"):
        steps, losses = np.asarray(history["loss"], dtype=float).T
        ax_loss.plot(steps, losses, color="0.75", lw=0.8, label="loss per step")
        window = max(1, len(losses) // 20)
        if window > 1:
            ax_loss.plot(steps[window - 1:], _smooth(losses, window), color="C0", lw=1.8,
                         label=f"moving average ({window} steps)")
        ax_loss.set_yscale("log")
    ax_loss.set(xlabel="step", ylabel="weighted cross-entropy", title="training loss")
    ax_loss.legend(loc="upper right")
    val = history.get("val") or []
    if val:
        steps = [v["step"] for v in val]
        for key, label in (("pixel_error", "pixel error"), ("rand_error", "Rand error"),
                           ("all_foreground_pixel_error", "pixel error of all-foreground")):
            style = dict(ls="--", color="0.5") if key.startswith("all") else dict(marker="o")
            ax_val.plot(steps, [v[key] for v in val], label=label, **style)
        ax_val.set_ylim(bottom=0)
    ax_val.set(xlabel="step", ylabel="error", title="validation")
    ax_val.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_prediction(image: np.ndarray, probability: np.ndarray, labels: np.ndarray | None, path,
                    threshold: float = 0.5) -> Path:
    """Image, foreground probability, and (with labels) where the thresholded prediction is wrong."""
    plt = _pyplot()
    path = Path(path)
    panels = 3 if labels is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 4.4))
    axes[0].imshow(image, cmap="gray")
    axes[0].set_title("input")
    shown = axes[1].imshow(probability, cmap="magma", vmin=0, vmax=1)
    axes[1].set_title("foreground probability")
    fig.colorbar(shown, ax=axes[1], fraction=0.046, pad=0.04)
    if labels is not None:
        predicted = probability > threshold
        truth = np.asarray(labels) > 0
        overlay = np.stack([image] * 3, axis=-1).astype(np.float32)
        overlay = 0.6 * overlay / max(float(overlay.max()), 1e-6)
        overlay[predicted & ~truth] = (1.0, 0.2, 0.2)   # false foreground: red
        overlay[~predicted & truth] = (0.2, 0.5, 1.0)   # missed foreground: blue
        error = float((predicted != truth).mean())
        axes[2].imshow(overlay)
        axes[2].set_title(f"errors (red: false fg, blue: missed) — {error:.3f}")
    for ax in axes:
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
