"""Share an erase as a LoRA file: `esd convert ESD.safetensors --to kohya|lora DST [--extract-lora R]`.

A LoRA run's `esd.safetensors` is already a LoRA (diffusers' layout) and is rewritten in kohya's layout
(`esd.kohya`), tensor for tensor. A weight erase (the paper's way) becomes a LoRA by a rank-R SVD of each
trained layer's change W_erased − W_base (`esd.lowrank.truncated`); the base weights come from `--model`, or
from the base model the file names in its metadata. Linear and convolution weights take a LoRA; what else
an erase changed (biases, norms, embeddings) cannot be one, and its share of the change is reported. Nothing
is written unless everything succeeded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from esd import kohya, lowrank
from esd.errors import EsdError
from esd.lora import is_lora
from esd.weights import TEXT_ENCODER, atomic_path, load_esd_weights

LAYOUTS = ("kohya", "lora")  # --to values that write a LoRA file from an ESD weights file
REPORT_RANKS = (1, 2, 4, 8, 16, 32, 64, 128)
# The recommendation printed with an extraction: the smallest reported rank whose error is at most this. On the
# testbed (ESD-x, one erase per kind, docs/results.md) rank 4 at 48-58% error already kept the erasure and the
# rest of the model as the full erase did; 20% leaves a wide margin for models and methods not measured.
RECOMMENDED_ERROR = 0.20


@dataclass
class Extraction:
    """What a rank-R LoRA of a weight erase keeps: per layer (relative error, ‖Δ‖), and at other ranks."""

    rank: int
    layers: dict[str, tuple[float, float]] = field(default_factory=dict)
    by_rank: dict[int, float] = field(default_factory=dict)  # total relative error at each rank
    left_out: dict[str, float] = field(default_factory=dict)  # tensors no LoRA can hold: their ‖Δ‖

    @property
    def error(self) -> float:
        return lowrank.total_error(self.layers)

    @property
    def left_out_share(self) -> float:
        """‖Δ‖ of the tensors left out against the whole change's."""
        left = sum(n**2 for n in self.left_out.values())
        total = left + sum(norm**2 for _, norm in self.layers.values())
        return (left / total) ** 0.5 if total else 0.0

    def lines(self) -> list[str]:
        worst = max(self.layers.items(), key=lambda kv: kv[1][0])
        out = [f"rank {self.rank}: relative error {self.error:.2%} of the change over {len(self.layers)} layers "
               f"(worst {worst[0]}: {worst[1][0]:.2%})"]
        out.append("  at other ranks: " + ", ".join(f"{r}: {e:.1%}" for r, e in self.by_rank.items()))
        good = [r for r, e in self.by_rank.items() if e <= RECOMMENDED_ERROR]
        if good:
            out.append(f"  recommended: rank {good[0]} or more (error <= {RECOMMENDED_ERROR:.0%}); on the testbed's "
                       "ESD-x erases rank 4 (48-58% error) already kept the erasure (docs/results.md)")
        if self.left_out:
            out.append(f"  left out (no LoRA holds them): {len(self.left_out)} tensors, e.g. {next(iter(self.left_out))}, "
                       f"{self.left_out_share:.2%} of the change")
        return out


def base_model(model: str | None, metadata: dict[str, str], src: Path):
    """(the base's parameters under weights-file names, name -> module): the network's, and the text
    encoder's as `text_encoder.<name>`. The base is `--model`, else the one the file's metadata names."""
    from esd.models import load_pipeline
    from esd.networks import network

    source = model or metadata.get("base_model") or None
    try:
        pipe = load_pipeline(source)
    except (EsdError, OSError, ValueError) as err:
        raise EsdError(f"{src}: its base model {source!r} does not load ({err}); name it with --model") from err
    parts = {"": network(pipe)}
    if getattr(pipe, "text_encoder", None) is not None:
        parts[TEXT_ENCODER] = pipe.text_encoder
    params = {prefix + n: p for prefix, part in parts.items() for n, p in part.named_parameters()}

    def module_of(name: str) -> nn.Module:
        prefix = TEXT_ENCODER if name.startswith(TEXT_ENCODER) else ""
        return parts[prefix].get_submodule(name[len(prefix):])

    return params, module_of


def part_of(name: str, network_part: str) -> str:
    """`text_encoder.<module>` stays; a denoising-network name gets its pipeline part (`unet.<module>`)."""
    return name if name.startswith(TEXT_ENCODER) else f"{network_part}.{name}"


def adaptable(params: dict[str, nn.Parameter], name: str, module_of) -> bool:
    """Whether a LoRA can hold this tensor's change: the weight of a linear or 2-D convolution layer."""
    module, _, leaf = name.rpartition(".")
    return leaf == "weight" and params[name].dim() in (2, 4) and isinstance(module_of(module), (nn.Linear, nn.Conv2d))


@torch.no_grad()
def extract_lora(tensors: dict[str, Tensor], base: dict[str, nn.Parameter], rank: int, network_part: str,
                 src: Path, module_of) -> tuple[kohya.Lora, Extraction]:
    """A rank-`rank` LoRA of the change the weights file makes to `base`, and what it keeps."""
    unknown = [n for n in tensors if n not in base or base[n].shape != tensors[n].shape]
    if unknown:
        raise EsdError(f"{src}: {len(unknown)} tensors do not fit the base model, e.g. {unknown[:3]}; was it made "
                       "for another model? Name its base with --model")
    report, lora = Extraction(rank=rank), {}
    deltas = {n: t.double() - base[n].detach().double() for n, t in tensors.items()}
    fits = {n: d for n, d in deltas.items() if adaptable(base, n, module_of)}
    largest = max((lowrank.max_rank(d.shape) for d in fits.values()), default=0)
    if rank > largest:  # a narrower layer keeps its exact update, zero-padded to rank R (`lowrank.padded`)
        raise EsdError(f"--extract-lora {rank}: larger than every layer allows (the largest, out x in, allows "
                       f"{largest}); --extract-lora {largest} already reproduces every layer exactly")
    singular = {}
    for name, delta in deltas.items():
        if name not in fits:
            report.left_out[name] = float(delta.norm())
            continue
        if not bool(delta.any()):  # an untouched layer needs no LoRA
            continue
        factors = lowrank.svd(delta)  # once per layer: the factors and every rank's error come from it
        singular[name] = factors[1]
        down, up = lowrank.truncated(factors, min(rank, lowrank.max_rank(delta.shape)), delta.shape)
        lora[part_of(name.removesuffix(".weight"), network_part)] = lowrank.padded(down, up, rank)
        report.layers[name] = (lowrank.rank_error(singular[name], rank), float(delta.norm()))  # 0 past its max
    if not lora:
        raise EsdError(f"{src}: no linear or convolution weight changed, so there is no LoRA to extract")
    for r in (r for r in REPORT_RANKS if r <= largest):
        report.by_rank[r] = lowrank.total_error(
            {n: (lowrank.rank_error(s, r), report.layers[n][1]) for n, s in singular.items()})
    return lora, report


def export_lora(src: str | Path, dst: str | Path, to: str, rank: int | None = None,
                model: str | None = None) -> tuple[Path, Extraction | None]:
    """Write the erase in SRC (an `esd.safetensors`) as a LoRA file DST in kohya's or diffusers' layout."""
    src, dst = Path(src), Path(dst)
    if to not in LAYOUTS:
        raise EsdError(f"--to {to}: a weights file converts to {' or '.join(LAYOUTS)}")
    if dst.suffix != ".safetensors":
        raise EsdError(f"{dst}: a LoRA file is written as .safetensors; choose a name ending in .safetensors")
    tensors, metadata = load_esd_weights(src)
    family = metadata.get("model_family", "")
    if to == "kohya":  # before any model is loaded
        kohya.check_family(family)
    report = None
    if is_lora(tensors):
        if rank is not None:
            raise EsdError(f"--extract-lora: {src} is already a LoRA (rank {metadata.get('lora_rank')}); "
                           "leave --extract-lora out to rewrite it as it is")
        lora = kohya.from_diffusers(tensors)
    else:
        if rank is None:
            raise EsdError(f"{src} holds erased weights, not a LoRA; add --extract-lora R to write a rank-R LoRA of "
                           "the change (the report says what each rank keeps), or convert the whole model instead")
        if rank < 1:
            raise EsdError(f"--extract-lora must be >= 1, got {rank}")
        params, modules = base_model(model, metadata, src)
        lora, report = extract_lora(tensors, params, rank, metadata.get("network", "unet"), src, modules)
    if to == "kohya":
        out, header = kohya.to_kohya(lora, family, metadata.get("prediction_type") == "v_prediction", name=dst.stem)
    else:
        out, header = kohya.to_diffusers(lora), {"format": "pt"}
    header["esd_concepts"] = metadata.get("concepts", "")
    header["esd_base_model"] = metadata.get("base_model", "")
    if report is not None:
        header["esd_extracted_rank"], header["esd_extraction_error"] = str(rank), f"{report.error:.6f}"
    with atomic_path(dst) as tmp:
        save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in out.items()}, str(tmp),
                  metadata=header)
    return dst, report
