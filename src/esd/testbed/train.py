"""Train the testbed: a complete SD1.x-layout `StableDiffusionPipeline` on rendered coloured shapes.

Reads top to bottom like the recipe (DESIGN.md §5):
  1. render a fixed pool of 32 px images from the seed (`render.py`);
  2. train a small AutoencoderKL (factor 2: 32x32x3 -> 16x16x4 latents) on it, briefly;
  3. train the CLIP text encoder and the UNet jointly with the ε-MSE loss on the pool's latents, captions
     "a red circle" / "a circle" / "a red shape" / "" (the last for classifier-free guidance), EMA weights;
  4. save the EMA pipeline with `save_pretrained`, train the shape/colour classifier, measure quality and
     write the model card.
Everything is drawn from the seed; a resumable checkpoint (`<out>/checkpoint/`) is written every few
minutes and on Ctrl-C, and training continues from it when run again.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import CLIPTextModel

from esd.errors import EsdError, NonFiniteLossError
from esd.testbed.render import COLOURS, SHAPES, SIZE, caption, render_batch
from esd.tiny import sd_pipeline, tiny_scheduler, tiny_text_encoder
from esd.tokenizer import TOKENIZER_DIR, clip_tokenizer

VAE_FACTOR = 2  # 32 px -> 16x16 latents: shapes stay distinct, the UNet stays cheap
LATENT_SIZE = SIZE // VAE_FACTOR


@dataclass
class TrainConfig:
    """Every setting of a testbed training run; saved in the checkpoint and the model card."""

    # model
    unet_channels: tuple[int, ...] = (32, 64, 128)  # ~3.2 M UNet parameters at 16x16 latents
    text_dim: int = 64  # CLIP hidden size = the UNet's cross_attention_dim
    text_layers: int = 4  # a deeper encoder than 2 layers binds colour words reliably (DESIGN.md §5)
    vae_channels: tuple[int, ...] = (32, 64)  # two blocks = one downsample = factor 2
    # data
    pool_size: int = 40_000  # rendered once from the seed; ~120 MB as uint8
    p_empty: float = 0.1  # "" captions: classifier-free guidance dropout
    p_shape_only: float = 0.15  # "a circle": the shape word alone must carry the concept (for ESD)
    p_colour_only: float = 0.15  # "a red shape"
    # VAE phase
    vae_steps: int = 2000
    vae_batch_size: int = 64
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6  # as SD's VAE: a nearly deterministic autoencoder with a smooth latent
    vae_time_share: float = 0.2  # at most this share of the time budget goes to the VAE
    # diffusion phase
    batch_size: int = 256  # the shipped testbed's; use 32-64 on a CPU
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_steps: int = 200
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    # side tasks
    checkpoint_minutes: float = 5.0
    sample_every: int = 1000  # steps between sample grids (EMA weights, guidance 7.5)
    sample_seeds: int = 4  # columns of a sample grid (rows: the 12 "a {colour} {shape}" prompts)
    sample_steps: int = 25  # DDIM steps of a sample grid
    classifier_steps: int = 2000
    classifier_pool: int = 20_000  # renders the classifier trains on (augmented anew every step)
    eval_seeds: int = 16  # seeds per prompt of the final quality measurement
    eval_steps: int = 50
    extra: dict = field(default_factory=dict)  # free-form notes recorded in the card


# ----------------------------------------------------------------------------- models


def build_vae(cfg: TrainConfig) -> AutoencoderKL:
    """A small AutoencoderKL with SD's block types; factor 2**(len(channels)-1)."""
    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=SIZE,
    )


def build_text_encoder(cfg: TrainConfig) -> CLIPTextModel:
    """A small CLIP text model with the real vocabulary (49,408) and 77 positions, as SD1.x."""
    return tiny_text_encoder(cfg.text_dim, intermediate_size=4 * cfg.text_dim, num_hidden_layers=cfg.text_layers)


def build_unet(cfg: TrainConfig) -> UNet2DConditionModel:
    """An SD1.x-layout UNet (cross-attention down/up blocks + cross-attention mid block) at 16x16 latents."""
    n = len(cfg.unet_channels)
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,  # the pipeline's default image side is sample_size * VAE factor = 32 px
        in_channels=4,
        out_channels=4,
        block_out_channels=cfg.unet_channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=cfg.text_dim,
        attention_head_dim=4,  # diffusers reads this as the number of heads, as in SD1.x's config
        norm_num_groups=8,
    )


def build_scheduler() -> DDIMScheduler:
    """SD's own noise schedule: with it plain DDIM from pure noise works (a cosine schedule did not, §5)."""
    return tiny_scheduler()


def build_pipeline(
    vae: AutoencoderKL, text_encoder: CLIPTextModel, unet: UNet2DConditionModel
) -> StableDiffusionPipeline:
    """Wrap the parts in a diffusers pipeline (no safety checker: the testbed draws shapes)."""
    return sd_pipeline(vae, text_encoder, unet, build_scheduler())


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- data


def render_pool(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training images, (n, 3, S, S) uint8, with shape and colour indices (n,); fixed by the seed."""
    images, shapes, colours = render_batch(n, np.random.default_rng([seed, 1]))
    return (
        torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        torch.from_numpy(shapes),
        torch.from_numpy(colours),
    )


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the range the VAE works in."""
    return images.float() / 127.5 - 1


def caption_table() -> tuple[list[str], dict[tuple[int, int, int], int]]:
    """Every training caption, and its index for (template, shape, colour); template 0 full, 1 shape, 2 colour, 3 empty."""
    captions, index = [], {}
    for s, shape in enumerate(SHAPES):
        for c, colour in enumerate(COLOURS):
            for template, (sh, co) in enumerate([(shape, colour), (shape, None), (None, colour), (None, None)]):
                text = caption(sh, co)
                if text not in captions:
                    captions.append(text)
                index[(template, s, c)] = captions.index(text)
    return captions, index


def tokenize(captions: list[str]) -> torch.Tensor:
    """Token ids (n, 77), padded exactly as the pipeline pads prompts at inference."""
    tok = clip_tokenizer()
    return tok(
        captions, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def step_generator(seed: int, phase: int, step: int) -> torch.Generator:
    """A CPU generator fixed by (seed, phase, step): a resumed run draws the same batches as an unbroken one."""
    return torch.Generator().manual_seed(seed * 1_000_003 + phase * 100_000_007 + step)


def choose_captions(cfg: TrainConfig, shapes: torch.Tensor, colours: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Caption indices (B,) for a batch: full caption, shape only, colour only, or empty (CFG dropout)."""
    _, index = caption_table()
    u = torch.rand(len(shapes), generator=g)
    bounds = torch.tensor(
        [cfg.p_empty, cfg.p_empty + cfg.p_shape_only, cfg.p_empty + cfg.p_shape_only + cfg.p_colour_only]
    )
    bucket = torch.bucketize(u, bounds, right=True)  # 0 empty, 1 shape, 2 colour, 3 full
    template = torch.tensor([3, 1, 2, 0])[bucket]
    return torch.tensor([index[(int(t), int(s), int(c))] for t, s, c in zip(template, shapes, colours, strict=True)])


# ----------------------------------------------------------------------------- training steps


def vae_step(
    vae: AutoencoderKL,
    opt: torch.optim.Optimizer,
    cfg: TrainConfig,
    pool: torch.Tensor,
    step: int,
    seed: int,
    device: str,
) -> float:
    """One autoencoder step: reconstruction MSE + a tiny KL to keep the latent smooth for diffusion."""
    g = step_generator(seed, 1, step)
    idx = torch.randint(len(pool), (cfg.vae_batch_size,), generator=g)
    x = to_unit(pool[idx]).to(device)  # (B, 3, 32, 32)
    posterior = vae.encode(x).latent_dist
    z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g).to(device)
    recon = vae.decode(z).sample
    loss = F.mse_loss(recon, x) + cfg.vae_kl_weight * posterior.kl().mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


@torch.no_grad()
def encode_pool(
    vae: AutoencoderKL, pool: torch.Tensor, device: str, batch: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every pool image, (n, 4, 16, 16) each; latents are sampled per step from them."""
    means, stds = [], []
    for i in range(0, len(pool), batch):
        dist = vae.encode(to_unit(pool[i : i + batch]).to(device)).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def latent_scale(mean: torch.Tensor, std: torch.Tensor) -> float:
    """SD's `scaling_factor`: 1 / std of the latents, so the diffusion works on unit-variance data."""
    return float(1.0 / torch.sqrt(mean.var() + std.pow(2).mean()))


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then constant: training may stop at any time budget without a horizon."""
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    """EMA of the weights; the decay ramps up so that the average is not dominated by the random init."""
    d = min(decay, (1 + step) / (10 + step))
    ema_p = [p for p in ema.parameters()]
    torch._foreach_lerp_(ema_p, [p.detach() for p in model.parameters()], 1 - d)


def diffusion_step(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    opt: torch.optim.Optimizer,
    cfg: TrainConfig,
    data: dict[str, torch.Tensor],
    step: int,
    seed: int,
    device: str,
) -> float:
    """One ε-prediction step on text encoder + UNet: x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε, loss ||ε - ε_θ(x_t, c, t)||²."""
    g = step_generator(seed, 2, step)
    b = cfg.batch_size
    idx = torch.randint(len(data["mean"]), (b,), generator=g)
    cap = choose_captions(cfg, data["shapes"][idx], data["colours"][idx], g)
    idx_d = idx.to(device)
    x0 = data["mean"][idx_d] + data["std"][idx_d] * torch.randn((b, 4, LATENT_SIZE, LATENT_SIZE), generator=g).to(
        device
    )
    x0 = x0 * data["scale"]  # (B, 4, 16, 16), unit variance
    eps = torch.randn(x0.shape, generator=g).to(device)
    t = torch.randint(0, 1000, (b,), generator=g).to(device)
    alpha_bar = data["alphas_cumprod"][t].view(b, 1, 1, 1)
    x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps
    cond = text_encoder(data["tokens"][cap.to(device)])[0]  # (B, 77, D)
    loss = F.mse_loss(unet(x_t, t, cond).sample, eps)
    for group in opt.param_groups:
        group["lr"] = lr_at(cfg, step)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for group in opt.param_groups for p in group["params"]], cfg.grad_clip)
    opt.step()
    return loss.item()


# ----------------------------------------------------------------------------- side tasks


def grid_image(images: list[Image.Image], cols: int) -> Image.Image:
    """Paste equal-size images into a grid, row-major."""
    w, h = images[0].size
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


@torch.no_grad()
def write_samples(pipe: StableDiffusionPipeline, path: Path, seeds: int = 4, steps: int = 25) -> None:
    """A grid of every "a {colour} {shape}" prompt (rows) x `seeds` seeds (columns), with the EMA weights."""
    prompts = [f"a {c} {s}" for s in SHAPES for c in COLOURS]
    flat = [p for p in prompts for _ in range(seeds)]
    gens = [torch.Generator().manual_seed(i) for _ in prompts for i in range(seeds)]
    images = pipe(flat, num_inference_steps=steps, guidance_scale=7.5, generator=gens).images
    path.parent.mkdir(parents=True, exist_ok=True)
    grid_image(images, seeds).resize((seeds * SIZE * 2, len(prompts) * SIZE * 2), Image.NEAREST).save(path)


def save_checkpoint(
    ckpt_dir: Path, modules: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer], state: dict
) -> None:
    """Weights as safetensors, optimizer state as a weights_only-loadable torch file, progress as JSON; atomic."""
    tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {
        f"{name}.{k}": v.detach().cpu().contiguous() for name, m in modules.items() for k, v in m.state_dict().items()
    }
    save_file(tensors, tmp / "weights.safetensors")
    torch.save({name: opt.state_dict() for name, opt in optimizers.items()}, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    # Swap in the complete new checkpoint only once it is fully written (a Ctrl-C mid-save keeps the old one).
    old = ckpt_dir.with_name(ckpt_dir.name + ".old")
    if ckpt_dir.exists():
        ckpt_dir.rename(old)
    tmp.rename(ckpt_dir)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(
    ckpt_dir: Path, modules: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer]
) -> dict:
    """Restore what `save_checkpoint` wrote into the given modules and optimizers; returns the progress state."""
    tensors = load_file(ckpt_dir / "weights.safetensors")
    for name, m in modules.items():
        prefix = name + "."
        m.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
    opt_states = torch.load(ckpt_dir / "optimizer.pt", weights_only=True, map_location="cpu")
    for name, opt in optimizers.items():
        if name in opt_states and opt_states[name]["state"]:
            opt.load_state_dict(opt_states[name])
    return json.loads((ckpt_dir / "state.json").read_text())


def write_model_card(
    out_dir: Path, cfg: TrainConfig, state: dict, sizes: dict[str, int], metrics: dict | None, command: str
) -> None:
    """README.md: what the testbed is, how it was trained (command, data, steps, time) and its measured quality."""
    lines = [
        "# ESD testbed: a small Stable Diffusion pipeline that draws coloured shapes",
        "",
        "A complete diffusers `StableDiffusionPipeline` (AutoencoderKL + CLIP text encoder + CLIP tokenizer +",
        "SD1.x-layout UNet2DConditionModel + DDIM scheduler) trained from scratch on 32x32 renders of",
        f"{', '.join(SHAPES)} in {', '.join(COLOURS)} on a plain light background. It exists so that erasing,",
        "converting and evaluating with `esd` run offline in minutes, with measurable efficacy and specificity.",
        "",
        "```python",
        "from diffusers import StableDiffusionPipeline",
        'pipe = StableDiffusionPipeline.from_pretrained("models/testbed", safety_checker=None)',
        'image = pipe("a red circle").images[0]  # 32x32, DDIM 50 steps, guidance 7.5',
        "```",
        "",
        "## Model",
        f"- UNet: {sizes['unet'] / 1e6:.2f} M parameters, blocks {list(cfg.unet_channels)}, 16x16x4 latents, ε-prediction",
        f"- Text encoder: CLIP, hidden {cfg.text_dim}, {cfg.text_layers} layers, vocabulary 49,408, 77 positions "
        f"({sizes['text_encoder'] / 1e6:.2f} M parameters, most of them the unused vocabulary rows); real CLIP BPE tokenizer",
        f"- VAE: AutoencoderKL, factor {VAE_FACTOR}, {sizes['vae'] / 1e6:.2f} M parameters, scaling_factor {state['scaling_factor']:.4f}",
        "- Scheduler: DDIM with SD's schedule (scaled_linear 0.00085 -> 0.012, 1000 steps, steps_offset 1)",
        f"- Classifier (`classifier/`): small CNN labelling shape and colour of generated images, {state.get('classifier_accuracy', float('nan')):.4f} accuracy on fresh renders",
        "",
        "## Data",
        f"{cfg.pool_size:,} renders fixed by the seed (`esd.testbed.render`): shapes fill 45-75% of the frame, modest",
        f'position jitter, anti-aliased. Captions: "a {{colour}} {{shape}}" ({1 - cfg.p_empty - cfg.p_shape_only - cfg.p_colour_only:.0%}),',
        f'"a {{shape}}" ({cfg.p_shape_only:.0%}), "a {{colour}} shape" ({cfg.p_colour_only:.0%}), "" ({cfg.p_empty:.0%}, for classifier-free guidance).',
        "",
        "## Training",
        "```",
        command,
        "```",
        f"- seed {state['seed']}, device {state['device']}, VAE {state['vae_step']} steps (batch {cfg.vae_batch_size}), "
        f"diffusion {state['step']} steps (batch {cfg.batch_size}, AdamW lr {cfg.lr}, EMA {cfg.ema_decay})",
        f"- wall time {state['elapsed_s'] / 60:.1f} min; {state.get('s_per_step', float('nan')):.3f} s per diffusion step on {state['device']}",
        f"- settings: `{json.dumps({k: v for k, v in asdict(cfg).items() if k != 'extra'})}`",
    ]
    lines += [f"- {k}: {v}" for k, v in cfg.extra.items()]
    if metrics is not None:
        lines += [
            "",
            "## Measured quality",
            f'Every "a {{colour}} {{shape}}" prompt x {metrics["seeds_per_prompt"]} seeds, DDIM {metrics["steps"]} steps, '
            f"guidance {metrics['guidance']}, judged by the shipped classifier (`esd testbed eval`, see `eval/metrics.json`, `eval/grid.png`):",
            "",
            f"- prompted shape found: **{metrics['shape_accuracy']:.1%}**; prompted colour found: **{metrics['colour_accuracy']:.1%}**",
            "",
            "| concept | accuracy |",
            "| --- | --- |",
        ]
        lines += [f"| {k} | {v:.1%} |" for k, v in metrics["per_concept"].items()]
    (out_dir / "README.md").write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- phases


def train_vae(
    vae,
    opt,
    cfg: TrainConfig,
    pool: torch.Tensor,
    state: dict,
    seed: int,
    device: str,
    deadline: float,
    maybe_checkpoint,
) -> None:
    """Phase 2: autoencoder steps until `cfg.vae_steps` or the deadline (its share of the time budget)."""
    if not state["vae_done"]:
        bar = tqdm(total=cfg.vae_steps, initial=state["vae_step"], desc="vae", dynamic_ncols=True, mininterval=1)
        while state["vae_step"] < cfg.vae_steps and time.time() < deadline:
            loss = vae_step(vae, opt, cfg, pool, state["vae_step"], seed, device)
            state["vae_step"] += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            maybe_checkpoint()
        bar.close()
        state["vae_done"] = True
    vae.eval().requires_grad_(False)


def latent_data(vae: AutoencoderKL, cfg: TrainConfig, pool, shapes, colours, state: dict, device: str) -> dict:
    """Everything a diffusion step draws from: pool latents, labels, caption tokens, the noise schedule."""
    mean, std = encode_pool(vae, pool, device)
    state["scaling_factor"] = latent_scale(mean, std)
    vae.register_to_config(scaling_factor=state["scaling_factor"])  # the pipeline divides latents by it
    return {
        "mean": mean,
        "std": std,
        "scale": state["scaling_factor"],
        "shapes": shapes,
        "colours": colours,
        "tokens": tokenize(caption_table()[0]).to(device),
        "alphas_cumprod": build_scheduler().alphas_cumprod.to(device),
    }


def train_diffusion(
    models: dict,
    vae,
    opt,
    cfg: TrainConfig,
    data: dict,
    state: dict,
    seed: int,
    device: str,
    max_steps: int | None,
    deadline: float,
    maybe_checkpoint,
    out: Path,
) -> None:
    """Phase 3: ε-MSE steps on text encoder + UNet with EMA, sample grids as it goes, until max_steps or the deadline."""
    text_encoder, unet, ema_text, ema_unet = (
        models[k] for k in ("text_encoder", "unet", "ema_text_encoder", "ema_unet")
    )
    bar = tqdm(total=max_steps, initial=state["step"], desc="diffusion", dynamic_ncols=True, mininterval=1)
    step_time, step0 = 0.0, state["step"]  # time in training steps alone (not samples, saves)
    while (max_steps is None or state["step"] < max_steps) and time.time() < deadline:
        t0 = time.time()
        loss = diffusion_step(unet, text_encoder, opt, cfg, data, state["step"], seed, device)
        ema_update(ema_unet, unet, cfg.ema_decay, state["step"])
        ema_update(ema_text, text_encoder, cfg.ema_decay, state["step"])
        step_time += time.time() - t0
        state["step"] += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"diffusion loss became {loss} at step {state['step']}; the last checkpoint is kept"
            )
        if state["step"] % cfg.sample_every == 0:
            pipe = build_pipeline(vae, ema_text.eval(), ema_unet.eval())
            write_samples(pipe, out / "samples" / f"step-{state['step']:06d}.png", cfg.sample_seeds, cfg.sample_steps)
        maybe_checkpoint()
    bar.close()
    if state["step"] > step0:
        state["s_per_step"] = step_time / (state["step"] - step0)


# ----------------------------------------------------------------------------- the run


def train_testbed(
    out_dir: str | Path,
    seed: int = 0,
    minutes: float = 60.0,
    device: str = "cpu",
    max_steps: int | None = None,
    resume: bool = True,
    config: TrainConfig | None = None,
) -> Path:
    """Train the testbed pipeline into `out_dir` (diffusers folder + classifier/ + eval/ + README.md).

    Stops after `max_steps` diffusion steps or when `minutes` (counted over resumed runs too) are spent.
    A checkpoint in `<out_dir>/checkpoint/` is written every `config.checkpoint_minutes` and on Ctrl-C; with
    `resume` a later call continues from it. Returns `out_dir`.
    """
    cfg = config or TrainConfig()
    out = Path(out_dir)
    ckpt_dir = out / "checkpoint"
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # small models: TF32 is plenty and faster
        torch.backends.cudnn.allow_tf32 = True

    vae, text_encoder, unet = build_vae(cfg), build_text_encoder(cfg), build_unet(cfg)
    ema_text, ema_unet = copy.deepcopy(text_encoder).requires_grad_(False), copy.deepcopy(unet).requires_grad_(False)
    modules = {
        "vae": vae,
        "text_encoder": text_encoder,
        "unet": unet,
        "ema_text_encoder": ema_text,
        "ema_unet": ema_unet,
    }
    for m in modules.values():
        m.to(device)
    vae_opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
    opt = torch.optim.AdamW([*text_encoder.parameters(), *unet.parameters()], lr=cfg.lr, weight_decay=cfg.weight_decay)
    optimizers = {"vae": vae_opt, "diffusion": opt}
    state = {
        "seed": seed,
        "device": device,
        "vae_step": 0,
        "vae_done": False,
        "step": 0,
        "elapsed_s": 0.0,
        "scaling_factor": 1.0,
    }
    if resume and (ckpt_dir / "state.json").exists():
        state = load_checkpoint(ckpt_dir, modules, optimizers)
        if state["seed"] != seed:
            raise EsdError(
                f"{ckpt_dir} was trained with seed {state['seed']}, not {seed}; pass that seed or --no-resume"
            )
        print(f"resumed from {ckpt_dir}: VAE step {state['vae_step']}, diffusion step {state['step']}", file=sys.stderr)
    budget_s = minutes * 60
    start = time.time() - state["elapsed_s"]
    last_ckpt = time.time()

    def checkpoint() -> None:
        state["elapsed_s"] = time.time() - start
        state["config"] = asdict(cfg)
        save_checkpoint(ckpt_dir, modules, optimizers, state)

    def maybe_checkpoint() -> None:
        nonlocal last_ckpt
        if time.time() - last_ckpt > cfg.checkpoint_minutes * 60:
            checkpoint()
            last_ckpt = time.time()

    pool, shapes, colours = render_pool(cfg.pool_size, seed)
    try:
        # --- 2. the autoencoder, then the pool's latents
        vae_deadline = start + cfg.vae_time_share * budget_s
        train_vae(vae, vae_opt, cfg, pool, state, seed, device, vae_deadline, maybe_checkpoint)
        data = latent_data(vae, cfg, pool, shapes, colours, state, device)
        # --- 3. text encoder + UNet, jointly
        models = {"text_encoder": text_encoder, "unet": unet, "ema_text_encoder": ema_text, "ema_unet": ema_unet}
        train_diffusion(
            models, vae, opt, cfg, data, state, seed, device, max_steps, start + budget_s, maybe_checkpoint, out
        )
        checkpoint()
    except KeyboardInterrupt:
        checkpoint()
        print(f"\ninterrupted: checkpoint saved to {ckpt_dir}; run the same command again to resume", file=sys.stderr)
        raise

    # --- 4. ship: EMA pipeline, classifier, measured quality, model card
    return finish(out, cfg, state, vae, ema_text, ema_unet, device)


def ship_tokenizer(folder: Path) -> None:
    """Replace the saved tokenizer by the project's vocab.json + merges.txt: smaller, and loadable by transformers 4.x."""
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(TOKENIZER_DIR, folder)


def finish(out: Path, cfg: TrainConfig, state: dict, vae, text_encoder, unet, device: str) -> Path:
    """Save the EMA pipeline, train the classifier if missing, measure quality and write the model card."""
    from esd.testbed.classifier import train_classifier
    from esd.testbed.evaluate import evaluate_testbed

    pipe = build_pipeline(vae.eval(), text_encoder.eval(), unet.eval())
    pipe.save_pretrained(out, safe_serialization=True)
    ship_tokenizer(out / "tokenizer")
    write_samples(pipe, out / "samples" / "final.png", cfg.sample_seeds, cfg.sample_steps)
    if not (out / "classifier" / "config.json").exists():
        train_classifier(
            out / "classifier",
            seed=state["seed"],
            steps=cfg.classifier_steps,
            device=device,
            pool_size=cfg.classifier_pool,
        )
    state["classifier_accuracy"] = json.loads((out / "classifier" / "config.json").read_text())["accuracy"]
    metrics = None
    if cfg.eval_seeds > 0:
        metrics = evaluate_testbed(
            pipe,
            out / "eval",
            erased=None,
            seeds_per_prompt=cfg.eval_seeds,
            steps=cfg.eval_steps,
            classifier_path=out / "classifier",
        )
    sizes = {"unet": n_params(unet), "text_encoder": n_params(text_encoder), "vae": n_params(vae)}
    command = (
        f"esd testbed train --seed {state['seed']} --device {state['device']} --output {out} "
        f"--batch-size {cfg.batch_size} --vae-steps {state['vae_step']} --max-steps {state['step']}"
    )
    write_model_card(out, cfg, state, sizes, metrics, command)
    shutil.rmtree(out / "checkpoint", ignore_errors=True)  # the shipped folder holds only the pipeline
    return out
