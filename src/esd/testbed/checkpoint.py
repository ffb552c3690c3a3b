"""Resumable checkpoints of a testbed training run: weights, optimizer state and progress, swapped in atomically."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


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
