"""Inference copies of the models, rewritten for the CPU: fewer passes over each activation.

Profiling a 64^3 window of the residual UNet in bfloat16 on a 2-core AVX512-BF16/AMX CPU
showed the convolutions took under a third of the forward pass: the rest was instance norm,
PReLU, the residual adds and, above all, copies. ``F.instance_norm`` makes a channels-last
input contiguous (a copy), autocast runs it in float32 (two more), and every call casts every
conv weight to bfloat16 again. The copy made here

* replaces each instance norm (no affine, no running statistics) followed by a PReLU, MONAI's
  ``ADN`` block, with :class:`InstanceNormPReLU`: per-sample ``batch_norm`` (the same
  statistics, accumulated in float32, in the input's dtype and memory format) then PReLU;
* replaces the other one-slope PReLUs with leaky ReLUs (:class:`OneSlopeLeakyReLU`) and the
  other instance norms with the same per-sample ``batch_norm`` (:class:`InstanceNormAsBatchNorm`,
  the cross-modal model's residual blocks);
* stores the feature convolutions' weights in the run's reduced precision once (autocast
  would cast them to exactly these values on every call);
* puts weights in channels-last 3D, so oneDNN (AMX on this CPU) reads activations without
  reordering them.

The user's model is never modified; the copy has the same weights and, up to the rounding of
the reduced precision, the same outputs (tested against the float32 path and MONAI's).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class InstanceNormPReLU(nn.Module):
    """Instance norm without affine or running statistics, then a one-slope PReLU, for
    inference.

    ``batch_norm`` over a single sample is instance norm, and unlike ``instance_norm`` it keeps
    a channels-last bfloat16 input as it is (float32 accumulation inside). Each sample is
    normalised straight into its place in one output (no concatenation: 0.8x the time at
    batch 2), then the PReLU is applied in place (a one-slope PReLU is a leaky ReLU).
    """

    def __init__(self, eps: float, prelu: nn.PReLU) -> None:
        super().__init__()
        self.eps = float(eps)
        self.slope = float(prelu.weight.detach().reshape(()).item())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu_(per_sample_batch_norm(x, None, None, self.eps), self.slope)


def per_sample_batch_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """Instance norm of ``x`` as one ``batch_norm`` per sample, written into one output in
    ``x``'s dtype and memory format (float32 accumulation inside); ``weight`` and ``bias``
    (the norm's affine, or None) are used in ``x``'s dtype, as the op requires."""
    out = torch.empty_like(x)  # keeps x's memory format; each sample written in place
    stats = x.new_empty(0)  # per-sample mean and 1/std, unused (the output holds them)
    if weight is not None:
        weight = weight.to(x.dtype)
    if bias is not None:
        bias = bias.to(x.dtype)
    with torch.autocast(x.device.type, enabled=False):
        for i in range(x.shape[0]):
            torch.ops.aten.native_batch_norm.out(
                x[i : i + 1], weight, bias, None, None, True, 0.0, eps,
                out=out[i : i + 1], save_mean=stats, save_invstd=stats.clone(),
            )  # fmt: skip
    return out


class InstanceNormAsBatchNorm(nn.Module):
    """An instance norm without running statistics (affine or not) not followed by a PReLU,
    for inference: :func:`per_sample_batch_norm` with its affine. ``F.instance_norm`` copies
    a channels-last input and runs in float32 under autocast; the cross-modal model's residual
    blocks (instance norm + leaky ReLU in their own ``forward``) ran 1.2-1.4x faster a 64^3
    window with these, the conv weights stored in bfloat16 and channels-last."""

    def __init__(self, norm: nn.InstanceNorm3d) -> None:
        super().__init__()
        self.eps = float(norm.eps)
        self.weight = None if norm.weight is None else norm.weight.detach().clone()
        self.bias = None if norm.bias is None else norm.bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return per_sample_batch_norm(x, self.weight, self.bias, self.eps)


class OneSlopeLeakyReLU(nn.Module):
    """A one-slope PReLU for inference: a leaky ReLU with its slope fixed. Under autocast
    PReLU runs in float32 (a copy of its input in and a float32 output for the next layer);
    the leaky ReLU keeps the input's dtype and memory format (the residual UNet's last
    activation, on 16 full-resolution channels: 2.3 of 21 ms a 64^3 window in bfloat16)."""

    def __init__(self, prelu: nn.PReLU) -> None:
        super().__init__()
        self.slope = float(prelu.weight.detach().reshape(()).item())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x, self.slope)


def _replacements(model: nn.Module, match, make) -> list[tuple[nn.Module, str, nn.Module]]:
    """``(parent, name, make(child))`` for every child module of ``model`` that ``match``es."""
    return [
        (parent, name, make(child))
        for parent in model.modules()
        for name, child in parent.named_children()
        if match(child)
    ]


def _one_slope_prelu(module: nn.Module) -> bool:
    return isinstance(module, nn.PReLU) and module.weight.numel() == 1


def rewritable_norms(model: nn.Module) -> int:
    """How many instance norms of ``model`` its inference copy rewrites (each one without
    running statistics: fused with its PReLU, or alone)."""
    return sum(_batch_statistics_norm(m) for m in model.modules())


def _batch_statistics_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.InstanceNorm3d) and not module.track_running_stats


def _plain_instance_norm(module: nn.Module) -> bool:
    return _batch_statistics_norm(module) and not module.affine


def _fuse_norm_prelu(block: nn.Sequential) -> nn.Module | None:
    """The fused module for a sequence that is instance norm then a one-slope PReLU, with only
    identities and dropouts besides (no-ops: the features are computed in eval mode, MC
    dropout lives in the head), else None."""
    active = [m for m in block.children() if not isinstance(m, nn.Identity | nn.Dropout)]
    if (
        len(active) == 2
        and _plain_instance_norm(active[0])
        and _one_slope_prelu(active[1])
    ):
        return InstanceNormPReLU(active[0].eps, active[1])
    return None


def fusable_blocks(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """``(parent, name, fused replacement)`` for every norm + PReLU block of ``model``."""
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Sequential):
                replacement = _fuse_norm_prelu(child)
                if replacement is not None:
                    found.append((parent, name, replacement))
    return found


def inference_copy(
    model: nn.Module, dtype: torch.dtype | None, channels_last: bool, fuse: bool = True
) -> tuple[nn.Module, int]:
    """A copy of ``model`` for inference only (see the module docstring) and the number of
    instance norms rewritten (norm + PReLU blocks fused, and lone norms). ``dtype`` (the
    autocast precision, or None for float32) is the precision the feature convolutions'
    weights are stored in; the MC head stays float32.

    A model with no instance norm to rewrite, or ``fuse=False`` (devices the rewrite was not
    measured on), is returned itself, in channels-last if asked (as before this module
    existed): nothing else of it is known to be safe to rewrite, and a large model is not
    copied for nothing.
    """
    if not fuse or not rewritable_norms(model):
        if channels_last:
            model = model.to(memory_format=torch.channels_last_3d)
        return model, 0
    inference = copy.deepcopy(model).eval()
    blocks = fusable_blocks(inference)
    prelus = _replacements(inference, _one_slope_prelu, OneSlopeLeakyReLU)
    for parent, name, replacement in [*blocks, *prelus]:
        setattr(parent, name, replacement)
    lone = _replacements(inference, _batch_statistics_norm, InstanceNormAsBatchNorm)
    for parent, name, replacement in lone:
        setattr(parent, name, replacement)
    head = getattr(inference, "mc_head", None)
    head_modules = set(head.modules()) if head is not None else set()
    if dtype is not None:
        for module in inference.modules():
            if isinstance(module, nn.Conv3d | nn.ConvTranspose3d) and module not in head_modules:
                module.to(dtype)
    if channels_last:
        inference = inference.to(memory_format=torch.channels_last_3d)
    for parameter in inference.parameters():
        parameter.requires_grad_(False)
    return inference, len(blocks) + len(lone)
