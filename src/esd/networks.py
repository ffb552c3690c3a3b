"""The denoising network of each family, called one way (docs/design.md, "Model families").

SD1.x/SD2.x/SDXL denoise with a UNet (`pipe.unet`), SD3/SD3.5, FLUX.1 and FLUX.2 with a transformer
(`pipe.transformer`). `forward(net, x, t, cond)` gives the network's native prediction for latents
x of shape (B, C, h, w) in every family: ε (or v) for the UNets, the flow-matching velocity for the
transformers. The trainer, the frozen model ε* and the samplers only ever call this, so they are the
same code for every family.

Timesteps: a UNet takes the integer training timestep t ∈ [0, 1000); a flow-matching transformer takes
σ·1000 (what its scheduler's `timesteps` hold, σ ∈ [0, 1] the noise level), FLUX divides it back to σ.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call


@dataclass
class Cond:
    """Text conditioning of one prompt: what the UNet takes besides x and t."""

    embeds: Tensor  # (1, 77, D) text encoder hidden states
    added: dict[str, Tensor] = field(default_factory=dict)  # SDXL: text_embeds (1, 1280), time_ids (1, 6)

    def repeat(self, n: int) -> Cond:
        return Cond(self.embeds.expand(n, *self.embeds.shape[1:]),
                    {k: v.expand(n, *v.shape[1:]) for k, v in self.added.items()})

    def to(self, device: torch.device | str) -> Cond:
        return Cond(self.embeds.to(device), {k: v.to(device) for k, v in self.added.items()})

    def rows(self, index: Tensor) -> Cond:
        """The conditioning of some rows of a batch (a one-row Cond stands for every row)."""
        if len(self.embeds) == 1:
            return self.repeat(len(index))
        return Cond(self.embeds[index], {k: v[index] if len(v) == len(self.embeds) else v
                                         for k, v in self.added.items()})

    @staticmethod
    def cat(a: Cond, b: Cond) -> Cond:
        return Cond(torch.cat([a.embeds, b.embeds]), {k: torch.cat([a.added[k], b.added[k]]) for k in a.added})



# Family of a network class, by class name (importing diffusers' transformer classes is slow and optional).
TRANSFORMER_FAMILIES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux",
                        "Flux2Transformer2DModel": "flux2"}


def network(pipe) -> nn.Module:
    """The pipeline's denoising network: the UNet, or the transformer of a flow-matching family."""
    net = getattr(pipe, "unet", None)
    return net if net is not None else pipe.transformer


def is_transformer(net: nn.Module) -> bool:
    return type(net).__name__ in TRANSFORMER_FAMILIES


def forward(net: nn.Module, x: Tensor, t: Tensor, cond: Cond, params: dict[str, Tensor] | None = None) -> Tensor:
    """The network's native prediction at (x, t, cond); with `params`, those parameter values are used for
    this one call instead of the network's own (how ε* shares the trained network: esd.frozen)."""

    def call(**kwargs):
        if params is None:
            return net(**kwargs)
        return functional_call(net, params, (), kwargs, strict=False)

    kind = TRANSFORMER_FAMILIES.get(type(net).__name__)
    text = cond.embeds.to(x.dtype)
    if kind is None:  # a UNet
        added = {"added_cond_kwargs": cond.added} if cond.added else {}
        return call(sample=x, timestep=t, encoder_hidden_states=text, **added).sample
    if kind == "flux2":
        return _flux2_forward(net, call, x, t, cond, text)
    pooled = cond.added["pooled_projections"].to(x.dtype)
    if kind == "sd3":
        return call(hidden_states=x, timestep=t, encoder_hidden_states=text, pooled_projections=pooled).sample
    return _flux_forward(net, call, x, t, cond, text, pooled)


def _flux_forward(net, call, x: Tensor, t: Tensor, cond: Cond, text: Tensor, pooled: Tensor) -> Tensor:
    """FLUX takes 2x2 patches of the latent as a token sequence, with 3-axis position ids for image and text
    (text ids are zeros, as FluxPipeline makes them), σ instead of σ·1000, and, for guidance-distilled
    checkpoints (FLUX.1-dev), the guidance scale as an input."""
    b, c, h, w = x.shape
    tokens = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
    img_ids = flux_image_ids(h // 2, w // 2).to(x.device, x.dtype)
    txt_ids = text.new_zeros(text.shape[1], 3)
    guidance = cond.added.get("guidance") if net.config.guidance_embeds else None
    out = call(hidden_states=tokens, timestep=t.to(x.dtype) / 1000, guidance=guidance, pooled_projections=pooled,
               encoder_hidden_states=text, txt_ids=txt_ids, img_ids=img_ids).sample
    return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def flux_image_ids(rows: int, cols: int) -> Tensor:
    """FLUX's image position ids: (rows·cols, 3) holding (0, row, column) of each patch, row-major."""
    grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), dim=-1)
    return torch.cat([torch.zeros(rows, cols, 1), grid.float()], dim=-1).reshape(rows * cols, 3)


def _flux2_forward(net, call, x: Tensor, t: Tensor, cond: Cond, text: Tensor) -> Tensor:
    """FLUX.2 works on the VAE latent's 2x2 patches as channels (32 -> 128, in Flux2Pipeline's order), one token
    per patch, with 4-axis position ids (t, h, w, l): (0, row, column, 0) for the image, (0, 0, 0, i) for text
    token i. No pooled text; σ instead of σ·1000; the guidance scale as an input only where the checkpoint is
    guidance-distilled (FLUX.2-dev; klein has none)."""
    b, c, h, w = x.shape
    rows, cols = h // 2, w // 2
    patches = x.view(b, c, rows, 2, cols, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, rows * cols)
    img_ids = torch.cartesian_prod(torch.arange(1), torch.arange(rows), torch.arange(cols), torch.arange(1))
    txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(text.shape[1]))
    guidance = cond.added.get("guidance") if net.config.guidance_embeds else None
    out = call(hidden_states=patches.transpose(1, 2), timestep=t.to(x.dtype) / 1000, guidance=guidance,
               encoder_hidden_states=text, txt_ids=txt_ids.expand(b, -1, -1).to(x.device),
               img_ids=img_ids.expand(b, -1, -1).to(x.device)).sample
    out = out.transpose(1, 2).reshape(b, c, 2, 2, rows, cols)
    return out.permute(0, 1, 4, 2, 5, 3).reshape(b, c, h, w)
