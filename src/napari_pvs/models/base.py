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

from napari_pvs.models import modality_list


class MCHead(nn.Module):
    """Channel dropout + 1x1x1 conv to one logit: the cheap stochastic part for MC sampling."""

    def __init__(self, channels: int, dropout: float = 0.2, conv: nn.Module | None = None) -> None:
        super().__init__()
        self.dropout = float(dropout)
        self.conv = conv if conv is not None else nn.Conv3d(channels, 1, kernel_size=1)

    def forward(self, features: torch.Tensor, sample: bool = False) -> torch.Tensor:
        active = (self.training or sample) and self.dropout > 0
        return self.conv(F.dropout3d(features, p=self.dropout, training=active))


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
        if not torch.isfinite(image).all():
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
