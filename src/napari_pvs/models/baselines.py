"""Image-only reference models: a compact residual UNet and MONAI's MedNeXt family.

They hold the cross-modal model to account in the ablation: same contract, same training code,
no text. MedNeXt-L-k5 follows MedNet-PVS (deep supervision while training, inputs padded to
multiples of 16 and cropped back); the S/B/M sizes are for CPU work.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets import UNet
from monai.networks.nets.mednext import MedNeXt
from torch import nn

from napari_pvs.models import size_divisor
from napari_pvs.models.base import MCHead, SegmentationModel


class ResidualUNet(SegmentationModel):
    """MONAI's residual UNet producing ``feature_channels`` maps, then the MC head."""

    def __init__(
        self,
        channels: Sequence[int] = (16, 32, 64, 128),
        num_res_units: int = 2,
        feature_channels: int = 16,
        dropout: float = 0.2,
    ) -> None:
        channels = [int(c) for c in channels]
        if len(channels) < 2:
            raise ValueError("unet needs at least two levels in 'channels', e.g. [16, 32, 64]")
        config = {
            "channels": channels,
            "num_res_units": int(num_res_units),
            "feature_channels": int(feature_channels),
            "dropout": float(dropout),
        }
        super().__init__("unet", config, size_divisor=size_divisor("unet", config))
        self.unet = UNet(
            spatial_dims=3,
            in_channels=1,
            out_channels=int(feature_channels),
            channels=channels,
            strides=[2] * (len(channels) - 1),
            num_res_units=int(num_res_units),
            norm="INSTANCE",
        )
        self.act = nn.PReLU()
        self.mc_head = MCHead(int(feature_channels), dropout)

    def _features(self, image: torch.Tensor, modalities: list[str]) -> torch.Tensor:
        return self.act(self.unet(image))


#: MedNeXt sizes from the MedNeXt paper (as in MONAI's create_mednext).
MEDNEXT_SIZES: dict[str, dict] = {
    "S": dict(
        encoder_expansion_ratio=2,
        decoder_expansion_ratio=2,
        bottleneck_expansion_ratio=2,
        blocks_down=(2, 2, 2, 2),
        blocks_bottleneck=2,
        blocks_up=(2, 2, 2, 2),
    ),
    "B": dict(
        encoder_expansion_ratio=(2, 3, 4, 4),
        decoder_expansion_ratio=(4, 4, 3, 2),
        bottleneck_expansion_ratio=4,
        blocks_down=(2, 2, 2, 2),
        blocks_bottleneck=2,
        blocks_up=(2, 2, 2, 2),
    ),
    "M": dict(
        encoder_expansion_ratio=(2, 3, 4, 4),
        decoder_expansion_ratio=(4, 4, 3, 2),
        bottleneck_expansion_ratio=4,
        blocks_down=(3, 4, 4, 4),
        blocks_bottleneck=4,
        blocks_up=(4, 4, 4, 3),
    ),
    "L": dict(
        encoder_expansion_ratio=(3, 4, 8, 8),
        decoder_expansion_ratio=(8, 8, 4, 3),
        bottleneck_expansion_ratio=8,
        blocks_down=(3, 4, 8, 8),
        blocks_bottleneck=8,
        blocks_up=(8, 8, 4, 3),
    ),
}


class MedNeXtPVS(SegmentationModel):
    """MONAI MedNeXt with one logit channel; features = all but the last out conv."""

    def __init__(
        self,
        size: str = "L",
        kernel_size: int = 5,
        init_filters: int = 32,
        deep_supervision: bool = True,
        dropout: float = 0.2,
        name: str | None = None,
    ) -> None:
        size = str(size).upper()
        if size not in MEDNEXT_SIZES:
            raise ValueError(f"unknown MedNeXt size {size!r}; choose one of S, B, M, L")
        config = {
            "size": size,
            "kernel_size": int(kernel_size),
            "init_filters": int(init_filters),
            "deep_supervision": bool(deep_supervision),
            "dropout": float(dropout),
        }
        model_name = name or f"mednext_{size.lower()}"
        super().__init__(model_name, config, size_divisor=size_divisor(model_name, config))
        self.net = MedNeXt(
            spatial_dims=3,
            init_filters=int(init_filters),
            in_channels=1,
            out_channels=1,
            kernel_size=int(kernel_size),
            deep_supervision=bool(deep_supervision),
            use_residual_connection=True,
            norm_type="group",
            global_resp_norm=False,
            **MEDNEXT_SIZES[size],
        )
        # The MC head reuses MedNeXt's own output block, so weights keep MONAI's layout.
        self.mc_head = MCHead(int(init_filters), dropout, conv=self.net.out_0)

    def _decode(self, image: torch.Tensor, collect_deep: bool) -> tuple[torch.Tensor, list]:
        net = self.net
        x = net.stem(image)
        skips = []
        for stage, down in zip(net.enc_stages, net.down_blocks, strict=True):
            x = stage(x)
            skips.append(x)
            x = down(x)
        x = net.bottleneck(x)
        deep = []
        for i, (up, stage) in enumerate(zip(net.up_blocks, net.dec_stages, strict=True)):
            if collect_deep and net.do_ds and i < len(net.out_blocks):
                deep.append(net.out_blocks[i](x))
            x = stage(up(x) + skips[-(i + 1)])
        return x, deep[::-1]

    def _features(self, image: torch.Tensor, modalities: list[str]) -> torch.Tensor:
        return self._decode(image, collect_deep=False)[0]

    def training_outputs(
        self, image: torch.Tensor, modality: str | list[str] | None = None
    ) -> list[torch.Tensor]:
        """Full-resolution logits, then the deep-supervision logits (coarse, cropped to match)."""
        self.check_input(image)
        padded, size = self._pad(image)
        feats, deep = self._decode(padded, collect_deep=self.net.do_ds)
        logits = self.head(feats)[:, :, : size[0], : size[1], : size[2]]
        outputs = [logits]
        for level, coarse in enumerate(deep, start=1):
            factor = 2**level
            crop = [-(-s // factor) for s in size]
            outputs.append(coarse[:, :, : crop[0], : crop[1], : crop[2]])
        return outputs


def upsample_to(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Trilinear upsampling of coarse deep-supervision logits to ``size``."""
    return F.interpolate(logits, size=tuple(size), mode="trilinear", align_corners=False)


def build_unet(**config) -> ResidualUNet:
    return ResidualUNet(**config)


def build_mednext_l_k5(**config) -> MedNeXtPVS:
    config = {"kernel_size": 5, **config, "size": "L", "name": "mednext_l_k5"}
    return MedNeXtPVS(**config)


def _fixed_size(size: str):
    def build(**config) -> MedNeXtPVS:
        merged = {"kernel_size": 3, "init_filters": 16, **config, "size": size}
        merged["name"] = f"mednext_{size.lower()}"
        return MedNeXtPVS(**merged)

    build.__doc__ = f"MedNeXt-{size} (kernel 3, 16 initial filters by default: CPU-sized)."
    return build


build_mednext_s = _fixed_size("S")
build_mednext_b = _fixed_size("B")
build_mednext_m = _fixed_size("M")
