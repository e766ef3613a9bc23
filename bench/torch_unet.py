"""The PyTorch peer of ``unet_cuda.UNet``: the same network, loss and optimiser, layer for layer.

* valid 3x3 convolutions + ReLU, two per level; 2x2 stride-2 max-pool between contracting levels;
  2x2 stride-2 transposed convolution halving the channels; concatenation ``[up, centre-cropped
  skip]``; a final 1x1 convolution (PAPER.md, model.py);
* dropout (inverted, p = 0.5) after the second convolution of the two deepest contracting levels,
  before the pool and the skip, in training only;
* the loss of ``softmax_xent_forward``: pixel-wise softmax cross-entropy times the weight map,
  summed and divided by the pixel count N*H*W;
* Caffe's SGD with momentum: ``v = momentum v + lr (grad + weight_decay w)``, ``w -= v``.

Parameter names equal ours (``down0.conv1.weight`` ... ``head.conv1x1.bias``), so
:meth:`TorchUNet.load_unet_state` copies ``UNet.state_dict()`` in directly. The one layout
difference: our up-convolution weight is ``[Cout, Cin, 2, 2]`` (OIHW like every weight of ours),
PyTorch's ``ConvTranspose2d`` keeps ``[Cin, Cout, 2, 2]``; the copy transposes it (and
:meth:`unet_state` transposes back).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TorchUNet", "CaffeSGD", "weighted_softmax_loss", "center_crop"]


class _Level(nn.Module):
    """Two valid 3x3 convolutions; on the expanding path also the up-convolution before them."""

    def __init__(self, cin: int, cout: int, upconv_from: int | None = None):
        super().__init__()
        if upconv_from is not None:
            self.upconv = nn.ConvTranspose2d(upconv_from, cout, kernel_size=2, stride=2)
        self.conv1 = nn.Conv2d(cin, cout, kernel_size=3)
        self.conv2 = nn.Conv2d(cout, cout, kernel_size=3)

    def convs(self, x):
        return F.relu(self.conv2(F.relu(self.conv1(x))))


class _Head(nn.Module):
    def __init__(self, cin: int, classes: int):
        super().__init__()
        self.conv1x1 = nn.Conv2d(cin, classes, kernel_size=1)


def center_crop(skip: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The centre ``height`` x ``width`` window of ``skip`` (a view)."""
    top = (skip.shape[-2] - height) // 2
    left = (skip.shape[-1] - width) // 2
    return skip[..., top:top + height, left:left + width]


class TorchUNet(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 2, base_channels: int = 64,
                 depth: int = 5, dropout: float = 0.5):
        super().__init__()
        self.depth = depth
        self.dropout_p = float(dropout)
        ch = [base_channels * 2 ** level for level in range(depth)]
        cin = in_channels
        for level in range(depth):
            self.add_module(f"down{level}", _Level(cin, ch[level]))
            cin = ch[level]
        for level in reversed(range(depth - 1)):
            self.add_module(f"up{level}", _Level(2 * ch[level], ch[level], upconv_from=ch[level + 1]))
        self.head = _Head(ch[0], num_classes)
        self.dropout_levels = {level for level in (depth - 2, depth - 1) if level >= 0}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        h = x
        for level in range(self.depth):
            h = getattr(self, f"down{level}").convs(h)
            if level in self.dropout_levels and self.dropout_p > 0:
                h = F.dropout(h, self.dropout_p, self.training)
            if level < self.depth - 1:
                skips.append(h)
                h = F.max_pool2d(h, 2)
        for level in reversed(range(self.depth - 1)):
            block = getattr(self, f"up{level}")
            h = block.upconv(h)
            h = torch.cat([h, center_crop(skips[level], h.shape[-2], h.shape[-1])], dim=1)
            h = block.convs(h)
        return self.head.conv1x1(h)

    # ------------------------------------------------------------------ weights from and to ours
    @staticmethod
    def _is_upconv_weight(name: str) -> bool:
        return name.endswith("upconv.weight")

    @torch.no_grad()
    def load_unet_state(self, state: dict) -> "TorchUNet":
        """Copy ``unet_cuda.UNet.state_dict()`` (NumPy arrays by our names) into this network."""
        own = dict(self.named_parameters())
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"TorchUNet.load_unet_state: names differ: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        for name, param in own.items():
            value = np.asarray(state[name], dtype=np.float32)
            if self._is_upconv_weight(name):
                value = value.transpose(1, 0, 2, 3)
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(f"TorchUNet.load_unet_state: {name} has shape {value.shape}, "
                                 f"this network needs {tuple(param.shape)}")
            param.copy_(torch.from_numpy(np.ascontiguousarray(value)))
        return self

    @torch.no_grad()
    def unet_state(self) -> dict:
        """Parameters as NumPy arrays in our layout (the inverse of :meth:`load_unet_state`)."""
        out = {}
        for name, param in self.named_parameters():
            value = param.detach().float().cpu().numpy()
            if self._is_upconv_weight(name):
                value = value.transpose(1, 0, 2, 3)
            out[name] = np.ascontiguousarray(value)
        return out


def weighted_softmax_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum w * -log softmax(logits)[label] / (N*H*W)``, computed in float32."""
    per_pixel = F.cross_entropy(logits.float(), labels.long(), reduction="none")
    return (per_pixel * weights.float()).sum() / labels.numel()


class CaffeSGD:
    """SGD with momentum as Caffe (and ``unet_cuda.SGD``) applies it, over all tensors at once."""

    def __init__(self, params, lr: float, momentum: float = 0.99, weight_decay: float = 0.0):
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self.velocity = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        pairs = [(p, v) for p, v in zip(self.params, self.velocity) if p.grad is not None]
        if not pairs:
            return
        params = [p for p, _ in pairs]
        velocity = [v for _, v in pairs]
        grads = [p.grad for p in params]
        if self.weight_decay:
            grads = torch._foreach_add(grads, params, alpha=self.weight_decay)
        torch._foreach_mul_(velocity, self.momentum)
        torch._foreach_add_(velocity, grads, alpha=self.lr)
        torch._foreach_sub_(params, velocity)
