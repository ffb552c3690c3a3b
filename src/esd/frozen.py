"""The frozen original model ε* (docs/design.md, "Memory design"), without a second UNet by default.

Only the trained subset θ ever changes, so ε* is the same UNet evaluated with the *original* values of
θ swapped in: `torch.func.functional_call` does that for one call, leaving the trained tensors alone.
The extra memory is one copy of θ (about 3% of the UNet for ESD-x), not a second UNet.
The 2023 layout (`--devices A,B`) and the benchmark baseline use a real frozen copy instead.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from esd.networks import Cond, forward
from esd.sampling import Denoiser, unet_denoiser


def original_values(params: dict[str, nn.Parameter]) -> dict[str, Tensor]:
    """Detached copies of the trained parameters before any update."""
    return {name: p.detach().clone() for name, p in params.items()}


def swapped_denoiser(unet: nn.Module, originals: dict[str, Tensor]) -> Denoiser:
    """ε* as the live network (UNet or transformer) with `originals` substituted for the trained parameters,
    per call."""

    @torch.no_grad()
    def eps(x: Tensor, t: Tensor, cond: Cond) -> Tensor:
        return forward(unet, x, t, cond, params=originals)

    return eps


def copied_denoiser(unet: nn.Module, device: torch.device | str | None = None) -> Denoiser:
    """ε* as a full frozen copy of the UNet, optionally on another device (outputs come back to the caller's)."""
    frozen = copy.deepcopy(unet).requires_grad_(False).eval()
    if device is not None:
        frozen.to(device)
    target = next(frozen.parameters()).device
    inner = unet_denoiser(frozen)

    @torch.no_grad()
    def eps(x: Tensor, t: Tensor, cond: Cond) -> Tensor:
        return inner(x.to(target), t.to(target), cond.to(target)).to(x.device)

    return eps
