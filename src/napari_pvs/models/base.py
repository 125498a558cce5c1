"""The shared model contract: input checks, pad-and-crop, and the features/head split.

Every architecture subclasses :class:`SegmentationModel` and implements ``_features`` on an
input already padded to ``size_divisor``; this class pads, crops the full-resolution features
back, and owns the Monte Carlo head. Keeping it here means every model accepts any volume
size and has identical error messages.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from napari_pvs.models import DEFAULT_SEGMENTATION_RULE, modality_list


class MCHead(nn.Module):
    """Channel dropout + 1x1x1 conv to one logit: the cheap stochastic part for MC sampling."""

    def __init__(self, channels: int, dropout: float = 0.2, conv: nn.Module | None = None) -> None:
        super().__init__()
        self.dropout = float(dropout)
        self.conv = conv if conv is not None else nn.Conv3d(channels, 1, kernel_size=1)

    def forward(self, features: torch.Tensor, sample: bool = False) -> torch.Tensor:
        active = (self.training or sample) and self.dropout > 0
        return self.conv(F.dropout3d(features, p=self.dropout, training=active))

    def samples(self, features: torch.Tensor, count: int) -> torch.Tensor:
        """``count`` Monte Carlo logits ``(count, B, K, D, H, W)`` from one read of ``features``.

        Dropping whole channels and then applying a 1x1x1 conv is the conv with its weights
        masked per sample, so all samples are one small matmul over channels instead of
        ``count`` passes that each copy the features. The masks are drawn exactly as
        ``F.dropout3d`` draws them, in the same order, so sample ``t`` equals the ``t``-th call
        of ``forward(features, sample=True)`` under the same seed (tested). Heads whose conv is
        not pointwise fall back to those calls.
        """
        pointwise = self._pointwise_weights(features.shape[1])
        if pointwise is None:
            return torch.stack([self.forward(features, sample=True) for _ in range(count)])
        weight, bias = pointwise  # (K, C), (K,)
        batch, channels = features.shape[:2]
        keep = 1.0 - self.dropout
        masks = []
        for _ in range(count):  # per-sample draws: identical RNG use to F.dropout3d
            noise = features.new_empty((batch, channels, 1, 1, 1))
            if self.dropout > 0:
                noise.bernoulli_(keep).div_(keep)
            else:
                noise.fill_(1.0)
            masks.append(noise.view(batch, 1, channels))
        mask = torch.cat(masks, dim=1)  # (B, T, C)
        weight = weight.to(features.dtype)
        masked = (mask[:, :, None, :] * weight[None, None]).flatten(1, 2)  # (B, T*K, C)
        spatial = features.shape[2:]
        if features.is_contiguous() or not features.is_contiguous(
            memory_format=torch.channels_last_3d
        ):
            logits = torch.matmul(masked, features.reshape(batch, channels, -1))  # (B, TK, V)
        else:  # channels-last: voxels are rows, so multiply from the right
            rows = features.permute(0, 2, 3, 4, 1).reshape(batch, -1, channels)
            logits = torch.matmul(rows, masked.transpose(1, 2)).transpose(1, 2)
        if bias is not None:
            logits = logits + bias.to(logits.dtype).repeat(count)[None, :, None]
        logits = logits.reshape(batch, count, weight.shape[0], *spatial)
        return logits.transpose(0, 1)

    def _pointwise_weights(self, channels: int) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The conv as a ``(K, C)`` matrix and bias when it is a plain 1x1x1 map, else None.

        Accepts ``Conv3d``/``ConvTranspose3d`` with kernel 1 (or a wrapper holding only such a
        conv, as MONAI's MedNeXt output block) after checking on a fixed probe that the matrix
        reproduces the module exactly, so a wrapper that adds anything is never shortcut.
        """
        convs = [m for m in self.conv.modules() if isinstance(m, nn.Conv3d | nn.ConvTranspose3d)]
        if len(convs) != 1:
            return None
        conv = convs[0]
        pointwise = (
            tuple(conv.kernel_size) == (1, 1, 1)
            and tuple(conv.stride) == (1, 1, 1)
            and tuple(conv.padding) == (0, 0, 0)
            and conv.groups == 1
            and conv.in_channels == channels
            and not any(getattr(conv, "output_padding", (0, 0, 0)))
        )
        if not pointwise:
            return None
        kernel = conv.weight[:, :, 0, 0, 0]
        weight = kernel.t() if isinstance(conv, nn.ConvTranspose3d) else kernel
        bias = conv.bias
        if self.conv is not conv:
            with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
                probe = torch.linspace(-1, 1, channels * 2, device=weight.device)
                probe = probe.to(weight.dtype).reshape(1, channels, 1, 1, 2)
                expected = self.conv(probe)
                got = torch.einsum("kc,bcdhw->bkdhw", weight, probe)
                if bias is not None:
                    got = got + bias.view(1, -1, 1, 1, 1)
            if expected.shape != got.shape or not torch.allclose(expected, got, atol=1e-5):
                return None
        return weight, bias


class SegmentationModel(nn.Module, ABC):
    """Base class: ``forward(image, modality) == head(features(image, modality))``."""

    def __init__(self, name: str, config: dict[str, Any], size_divisor: int) -> None:
        super().__init__()
        self.name = name
        self.config = dict(config)
        self.size_divisor = int(size_divisor)

    @abstractmethod
    def _features(self, image: torch.Tensor, modalities: list[str]) -> torch.Tensor:
        """Full-resolution decoder features of an input whose size divides ``size_divisor``."""

    mc_head: MCHead
    #: How probabilities become a mask; a checkpoint's calibrated rule replaces it on load.
    segmentation_rule: dict[str, float] = DEFAULT_SEGMENTATION_RULE

    # -- the contract ------------------------------------------------------------------------
    def check_input(self, image: torch.Tensor) -> None:
        """Raise ValueError naming the problem when ``image`` is not ``(B, 1, D, H, W)``."""
        if not isinstance(image, torch.Tensor):
            raise ValueError(f"image must be a torch.Tensor, got {type(image).__name__}")
        if image.ndim != 5:
            raise ValueError(
                f"image must have shape (batch, 1, D, H, W); got {tuple(image.shape)}. "
                "Add batch and channel axes, e.g. image[None, None]"
            )
        if image.shape[1] != 1:
            raise ValueError(
                f"image must have exactly 1 channel (one MRI contrast); got {image.shape[1]}. "
                "Segment each contrast separately"
            )
        # One sum is finite when every voxel is (NaN and inf propagate); only a sum that is
        # not (or that overflowed) needs the voxel-wise test, four passes over the window:
        # 1 of 36 ms of a 64^3 bfloat16 window on one CPU thread.
        if not torch.isfinite(image.sum()) and not torch.isfinite(image).all():
            raise ValueError(
                "image contains NaN or infinite values; replace them (e.g. torch.nan_to_num) "
                "and normalise with napari_pvs.intensity before segmenting"
            )

    def _pad(self, image: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        size = tuple(int(s) for s in image.shape[2:])
        div = self.size_divisor
        padded = tuple(-(-s // div) * div for s in size)
        if padded == size:
            return image, size
        pad: list[int] = []
        for s, p in zip(reversed(size), reversed(padded), strict=True):
            pad.extend([0, p - s])
        return F.pad(image, pad, mode="constant", value=0.0), size

    def features(
        self, image: torch.Tensor, modality: str | list[str] | None = None
    ) -> torch.Tensor:
        """Deterministic full-resolution features ``(B, C, D, H, W)``: the expensive part."""
        self.check_input(image)
        padded, size = self._pad(image)
        feats = self._features(padded, modality_list(modality, image.shape[0]))
        return feats[:, :, : size[0], : size[1], : size[2]]

    def head(self, features: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """Logits from features; ``sample=True`` keeps dropout on for Monte Carlo sampling."""
        return self.mc_head(features, sample=sample)

    def head_samples(self, features: torch.Tensor, count: int) -> torch.Tensor:
        """``count`` MC-dropout logits ``(count, B, 1, D, H, W)`` of one feature map, cheaply.

        Same distribution (and, under one seed, the same draws) as ``count`` calls of
        ``head(features, sample=True)``; see :meth:`MCHead.samples`.
        """
        return self.mc_head.samples(features, count)

    def forward(self, image: torch.Tensor, modality: str | list[str] | None = None) -> torch.Tensor:
        return self.head(self.features(image, modality))

    def training_outputs(
        self, image: torch.Tensor, modality: str | list[str] | None = None
    ) -> list[torch.Tensor]:
        """Logits used by the training loss, full resolution first (deep supervision adds more)."""
        return [self.forward(image, modality)]

    def num_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
