"""The tiny, seeded models the tests run real inference and training with (fast on CPU)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from napari_pvs.models import build_model
from napari_pvs.models.checkpoint import save_checkpoint


def tiny_unet(seed: int = 0, dropout: float | None = None, channels: Sequence[int] = (4, 8)):
    """A seeded residual UNet small enough to run whole test volumes in milliseconds.

    ``dropout`` None keeps the architecture's default (0.2); 0 makes training deterministic.
    """
    torch.manual_seed(seed)
    config = {"channels": list(channels), "num_res_units": 1, "feature_channels": 4}
    if dropout is not None:
        config["dropout"] = dropout
    return build_model("unet", **config).eval()


def tiny_checkpoint(path: Path, segmentation: dict | None = None, **model_options) -> Path:
    """:func:`tiny_unet` saved as a napari-pvs checkpoint at ``path`` (with ``segmentation`` as
    its calibrated rule, if given)."""
    return save_checkpoint(tiny_unet(**model_options), path, segmentation=segmentation)


class TinyConv(torch.nn.Module):
    """A two-convolution model following the features/head contract, in plain torch (no MONAI
    import), so a test can start it in a fresh process in about a second."""

    name = "tiny_conv"
    size_divisor = 1

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.config = {"seed": seed}
        self.conv = torch.nn.Conv3d(1, 4, 3, padding=1)
        self.out = torch.nn.Conv3d(4, 1, 1)

    def features(self, image: torch.Tensor, modality=None) -> torch.Tensor:
        return torch.relu(self.conv(image))

    def head(self, features: torch.Tensor, sample: bool = False) -> torch.Tensor:
        return self.out(torch.nn.functional.dropout3d(features, 0.2, training=sample))

    def forward(self, image: torch.Tensor, modality=None) -> torch.Tensor:
        return self.head(self.features(image, modality))
