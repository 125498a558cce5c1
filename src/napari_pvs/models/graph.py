"""Graph interaction between bottleneck image tokens and text tokens (torch-geometric).

Nodes are the coarse image tokens of each batch item plus that item's prompt tokens. Edges
join every image token to its k nearest neighbours in feature space (so distant but similar
structures, e.g. PVS in both hemispheres, exchange evidence) and every image token to every text
token in both directions (so the descriptions reach each location and vice versa). The kNN
graph is built with ``torch.cdist`` + ``topk`` because ``knn_graph`` needs pyg-lib/torch-cluster.
"""

from __future__ import annotations

import torch
from torch import nn
from torch_geometric.nn import GATConv, GCNConv


def knn_edges(tokens: torch.Tensor, k: int) -> torch.Tensor:
    """Edges ``(2, B*N*k)`` from each token's k nearest neighbours (feature space, no self).

    ``tokens`` is ``(B, N, C)``; node ``n`` of item ``b`` gets global index ``b * N + n``.
    Edges point neighbour -> token, the direction messages flow in torch-geometric.
    """
    batch, count, _ = tokens.shape
    k = min(int(k), count - 1)
    if k <= 0:
        return torch.empty(2, 0, dtype=torch.long, device=tokens.device)
    with torch.no_grad():
        distances = torch.cdist(tokens.float(), tokens.float())
        distances.diagonal(dim1=1, dim2=2).fill_(float("inf"))
        neighbours = distances.topk(k, dim=-1, largest=False).indices  # (B, N, k)
    offsets = (torch.arange(batch, device=tokens.device) * count).view(batch, 1, 1)
    targets = torch.arange(count, device=tokens.device).view(1, count, 1).expand(batch, count, k)
    source = (neighbours + offsets).reshape(-1)
    target = (targets + offsets).reshape(-1)
    return torch.stack([source, target])


def image_text_edges(batch: int, n_image: int, n_text: int, device=None) -> torch.Tensor:
    """Edges both ways between every image token and every text token of the same item.

    Global layout per item: image nodes first, then text nodes, items stacked; the image nodes
    of item ``b`` start at ``b * n_image`` and its text nodes at ``batch * n_image + b * n_text``.
    """
    image = torch.arange(n_image, device=device)
    text = torch.arange(n_text, device=device)
    img_idx, txt_idx = torch.meshgrid(image, text, indexing="ij")
    edges = []
    for b in range(batch):
        src = img_idx.reshape(-1) + b * n_image
        dst = txt_idx.reshape(-1) + batch * n_image + b * n_text
        edges.append(torch.stack([src, dst]))
        edges.append(torch.stack([dst, src]))
    return torch.cat(edges, dim=1)


class GraphInteraction(nn.Module):
    """Residual GCN/GAT layers over image + text nodes; returns the updated image tokens."""

    def __init__(self, channels: int, layers: int = 2, k: int = 8, layer_type: str = "gcn") -> None:
        super().__init__()
        if layer_type not in ("gcn", "gat"):
            raise ValueError(f"graph layer_type must be 'gcn' or 'gat', got {layer_type!r}")
        self.k = int(k)
        convs = []
        for _ in range(int(layers)):
            if layer_type == "gcn":
                convs.append(GCNConv(channels, channels))
            else:
                convs.append(GATConv(channels, channels // 4, heads=4, concat=True))
        self.convs = nn.ModuleList(convs)
        self.norms = nn.ModuleList(nn.LayerNorm(channels) for _ in convs)
        self.act = nn.GELU()

    def forward(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor | None) -> torch.Tensor:
        """Image tokens ``(B, N, C)`` and text tokens ``(B, T, C)`` (or None) -> ``(B, N, C)``."""
        batch, n_image, channels = image_tokens.shape
        edges = [knn_edges(image_tokens, self.k)]
        nodes = [image_tokens.reshape(batch * n_image, channels)]
        if text_tokens is not None and text_tokens.shape[1] > 0:
            n_text = text_tokens.shape[1]
            nodes.append(text_tokens.reshape(batch * n_text, channels))
            edges.append(image_text_edges(batch, n_image, n_text, image_tokens.device))
        x = torch.cat(nodes).float()
        edge_index = torch.cat(edges, dim=1)
        for conv, norm in zip(self.convs, self.norms, strict=True):
            x = norm(x + self.act(conv(x, edge_index)))
        return x[: batch * n_image].reshape(batch, n_image, channels).to(image_tokens.dtype)
