"""The cross-modal graph model for PVS segmentation (after MICCAI 2025, see DESIGN.md s.4).

Image branch: a 3D residual encoder-decoder. Text branch: the prompt bank of
:mod:`napari_pvs.models.text` for the input's modality, embedded once and kept as a buffer.
Text guides the encoder through FiLM at every level; at the bottleneck the image tokens meet the
text tokens three ways: a graph (kNN in feature space + image-text links, torch-geometric),
cross-modal attention (image tokens attend to the prompts), and the image-only path; a learned
per-token attention (dynamic fusion) mixes those branches. Every component is switched by
config (``use_text``, ``use_graph``, ``use_cross_attention``, ``use_fusion``) so ablations run
the same code.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from napari_pvs.models import MODALITIES, size_divisor
from napari_pvs.models.base import MCHead, SegmentationModel
from napari_pvs.models.graph import GraphInteraction

#: The compact default: quick on CPU. ``PAPER_CONFIG`` is the GPU-sized variant.
COMPACT_CONFIG: dict = {"channels": [16, 32, 64, 128], "blocks": 1, "graph_layers": 2}
PAPER_CONFIG: dict = {"channels": [32, 64, 128, 256, 320], "blocks": 2, "graph_layers": 3, "k": 16}


class ResBlock(nn.Module):
    """Two 3x3x3 convs with instance norm and a residual path."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, padding=1, bias=False)
        self.norm1 = nn.InstanceNorm3d(cout, affine=True)
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = nn.InstanceNorm3d(cout, affine=True)
        self.skip = nn.Conv3d(cin, cout, 1, bias=False) if cin != cout else nn.Identity()
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return self.act(y + self.skip(x))


def _stage(cin: int, cout: int, blocks: int) -> nn.Sequential:
    return nn.Sequential(ResBlock(cin, cout), *[ResBlock(cout, cout) for _ in range(blocks - 1)])


class CrossModalPVSNet(SegmentationModel):
    """Text-guided residual encoder-decoder with graph, cross-attention and dynamic fusion."""

    def __init__(
        self,
        channels: Sequence[int] = (8, 16, 32, 64),
        blocks: int = 1,
        use_text: bool = True,
        use_graph: bool = True,
        use_cross_attention: bool = True,
        use_fusion: bool = True,
        graph_layers: int = 2,
        graph_layer_type: str = "gcn",
        k: int = 8,
        heads: int = 4,
        dropout: float = 0.2,
        text_dim: int = 384,
        text_model: str | None = None,
        prompt_embeddings: np.ndarray | torch.Tensor | None = None,
    ) -> None:
        channels = [int(c) for c in channels]
        if len(channels) < 2:
            raise ValueError("cross_modal needs at least two levels in 'channels'")
        if channels[-1] % int(heads) != 0:
            raise ValueError(f"the last width {channels[-1]} must be divisible by heads={heads}")
        use_text = bool(use_text)
        config = {
            "channels": channels,
            "blocks": int(blocks),
            "use_text": use_text,
            "use_graph": bool(use_graph),
            # Cross-attention attends to text tokens: without text it has nothing to attend to.
            "use_cross_attention": bool(use_cross_attention) and use_text,
            "use_fusion": bool(use_fusion),
            "graph_layers": int(graph_layers),
            "graph_layer_type": str(graph_layer_type),
            "k": int(k),
            "heads": int(heads),
            "dropout": float(dropout),
            "text_dim": int(text_dim),
            "text_model": None if text_model is None else str(text_model),
        }
        super().__init__("cross_modal", config, size_divisor=size_divisor("cross_modal", config))
        self.use_text = config["use_text"]
        self.use_graph = config["use_graph"]
        self.use_cross_attention = config["use_cross_attention"]
        self.use_fusion = config["use_fusion"]
        width = channels[-1]

        # Text branch: fixed prompt embeddings (buffer, saved in checkpoints) + learned projection.
        if self.use_text:
            embeddings = self._initial_embeddings(prompt_embeddings, text_model, int(text_dim))
            self.register_buffer("prompt_embeddings", embeddings)
            self.text_proj = nn.Sequential(
                nn.Linear(embeddings.shape[-1], width), nn.LayerNorm(width)
            )
            self.films = nn.ModuleList(nn.Linear(width, 2 * c) for c in channels)
            for film in self.films:
                nn.init.normal_(film.weight, std=1e-2)
                nn.init.zeros_(film.bias)

        # Image encoder.
        blocks = int(blocks)
        self.stem = _stage(1, channels[0], blocks)
        self.downs = nn.ModuleList(
            nn.Conv3d(channels[i], channels[i + 1], 3, stride=2, padding=1)
            for i in range(len(channels) - 1)
        )
        self.enc_stages = nn.ModuleList(
            _stage(channels[i + 1], channels[i + 1], blocks) for i in range(len(channels) - 1)
        )

        # Bottleneck interaction.
        n_branches = 1
        if self.use_graph:
            self.graph = GraphInteraction(width, int(graph_layers), int(k), str(graph_layer_type))
            n_branches += 1
        if self.use_cross_attention:
            self.cross_attention = nn.MultiheadAttention(width, int(heads), batch_first=True)
            self.attn_norm = nn.LayerNorm(width)
            n_branches += 1
        if self.use_fusion and n_branches > 1:
            self.fusion = nn.Sequential(
                nn.Linear(n_branches * width, width), nn.GELU(), nn.Linear(width, n_branches)
            )

        # Decoder.
        self.ups = nn.ModuleList(
            nn.ConvTranspose3d(channels[i + 1], channels[i], 2, stride=2)
            for i in reversed(range(len(channels) - 1))
        )
        self.dec_stages = nn.ModuleList(
            _stage(2 * channels[i], channels[i], blocks) for i in reversed(range(len(channels) - 1))
        )
        self.mc_head = MCHead(channels[0], dropout)

    @staticmethod
    def _initial_embeddings(embeddings, text_model, text_dim: int) -> torch.Tensor:
        """Prompt embeddings given (a checkpoint), or computed now with the text encoder."""
        if embeddings is None:
            from napari_pvs.models.text import prompt_embeddings

            embeddings = prompt_embeddings(text_model)
        tensor = torch.as_tensor(np.asarray(embeddings), dtype=torch.float32).clone()
        if tensor.ndim != 3 or tensor.shape[0] != len(MODALITIES):
            raise ValueError(
                f"prompt embeddings must have shape ({len(MODALITIES)}, prompts, dim); "
                f"got {tuple(tensor.shape)}"
            )
        if tensor.shape[-1] != text_dim:
            raise ValueError(
                f"the text encoder gives {tensor.shape[-1]}-dim embeddings but text_dim={text_dim};"
                f" pass text_dim={tensor.shape[-1]}"
            )
        return tensor

    def text_tokens(self, modalities: list[str]) -> torch.Tensor:
        """Projected prompt tokens ``(B, T, C)`` for each item's modality."""
        device = self.prompt_embeddings.device
        index = torch.tensor([MODALITIES.index(m) for m in modalities], device=device)
        return self.text_proj(self.prompt_embeddings[index])

    def _modulate(self, x: torch.Tensor, level: int, text_summary: torch.Tensor | None):
        if text_summary is None:
            return x
        gamma, beta = self.films[level](text_summary).chunk(2, dim=-1)
        shape = (*gamma.shape, 1, 1, 1)
        return x * (1 + gamma.view(shape)) + beta.view(shape)

    def _bottleneck(self, x: torch.Tensor, text: torch.Tensor | None) -> torch.Tensor:
        batch, channels, *spatial = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, N, C)
        branches = [tokens]
        if self.use_graph:
            branches.append(self.graph(tokens, text))
        if self.use_cross_attention:
            attended, _ = self.cross_attention(tokens, text, text, need_weights=False)
            branches.append(self.attn_norm(tokens + attended))
        if len(branches) == 1:
            fused = tokens
        elif self.use_fusion:
            weights = torch.softmax(self.fusion(torch.cat(branches, dim=-1)), dim=-1)
            fused = sum(weights[..., i : i + 1] * b for i, b in enumerate(branches))
        else:
            fused = torch.stack(branches).mean(0)
        return fused.transpose(1, 2).reshape(batch, channels, *spatial)

    def _features(self, image: torch.Tensor, modalities: list[str]) -> torch.Tensor:
        text = self.text_tokens(modalities) if self.use_text else None
        summary = text.mean(1) if text is not None else None
        x = self._modulate(self.stem(image), 0, summary)
        skips = [x]
        for level, (down, stage) in enumerate(zip(self.downs, self.enc_stages, strict=True), 1):
            x = self._modulate(stage(down(x)), level, summary)
            skips.append(x)
        x = self._bottleneck(x, text)
        for up, stage, skip in zip(self.ups, self.dec_stages, reversed(skips[:-1]), strict=True):
            x = stage(torch.cat([up(x), skip], dim=1))
        return x


PRESETS = {"compact": COMPACT_CONFIG, "paper": PAPER_CONFIG}


def build_cross_modal(preset: str = "compact", **config) -> CrossModalPVSNet:
    """Cross-modal model from ``preset`` 'compact' (CPU default) or 'paper' (GPU) + overrides."""
    if preset not in PRESETS:
        raise ValueError(f"unknown cross_modal preset {preset!r}; use 'compact' or 'paper'")
    return CrossModalPVSNet(**{**PRESETS[preset], **config})
