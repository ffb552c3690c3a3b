"""The change an erase makes, as a LoRA and in half precision: pure tensor math, pinned by tests.

A weight-space erase (ESD-x, ESD-u, full) changes each trained layer by Δ = W_erased − W_base. A LoRA of rank r
stores B·A instead (B: out×r, A: r×in); the best rank-r approximation of Δ in the Frobenius norm is its
truncated SVD (Eckart–Young), taken per layer over the flattened input dims — a conv kernel out×in×k×k as an
out×(in·k·k) matrix, as kohya's tools and peft flatten it — so `truncated(svd(Δ), r, ...)` is that and
nothing more.

The same Δ is small against W (a short erase moves θ by parts in 10⁴), and half precision keeps about three
significant digits of W: a copy of the erased model cast to fp16/bf16 can round much of Δ away.
`kept_in` measures how much of the change such a copy still makes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

HALF_KEPT_LOW = 0.5  # below this share of the change kept in half precision, a warning names the fixes


def max_rank(shape: torch.Size | tuple[int, ...]) -> int:
    """The largest rank a LoRA of a layer with weight `shape` can have: min(out, in·k·k)."""
    return min(shape[0], math.prod(shape[1:]))


def svd(delta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """U, S, Vᵀ of Δ flattened to out × (in·k·k), singular values largest first (float64: Δ is small)."""
    return torch.linalg.svd(delta.detach().double().flatten(1), full_matrices=False)


def truncated(factors: tuple[Tensor, Tensor, Tensor], rank: int, shape: torch.Size,
              dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """(A, B) from Δ's SVD, B·A its best rank-`rank` approximation; A is r×in (r×in×k×k), B out×r (out×r×1×1).

    The singular values are split evenly between the factors (B = U·√S, A = √S·Vᵀ) so neither factor is tiny.
    """
    if not 1 <= rank <= max_rank(shape):
        raise ValueError(f"rank {rank} outside 1..{max_rank(shape)} for a layer of shape {tuple(shape)}")
    u, s, vh = factors
    root = s[:rank].sqrt()
    up, down = u[:, :rank] * root, root[:, None] * vh[:rank]
    if len(shape) == 4:
        down, up = down.view(rank, *shape[1:]), up.view(shape[0], rank, 1, 1)
    return down.to(dtype), up.to(dtype)


def padded(down: Tensor, up: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(A, B) grown to `rank` with zero rows of A and columns of B: the same B·A, one rank for every layer.

    A layer narrower than the rank asked for keeps its exact update; the file then has one rank and one alpha
    throughout, which every client reads the same way (diffusers drops per-layer alphas it cannot map).
    """
    extra = rank - down.shape[0]
    if extra <= 0:
        return down, up
    down = torch.cat([down, down.new_zeros(extra, *down.shape[1:])])
    up = torch.cat([up, up.new_zeros(up.shape[0], extra, *up.shape[2:])], dim=1)
    return down, up


def product(down: Tensor, up: Tensor) -> Tensor:
    """B·A in the layer's weight shape (conv: the 1×1 up kernel times the k×k down kernel)."""
    flat = up.flatten(1) @ down.flatten(1)
    return flat.view(up.shape[0], *down.shape[1:])


def rank_error(singular: Tensor, rank: int) -> float:
    """‖Δ − Δ_r‖ / ‖Δ‖ of the rank-`rank` truncation, from Δ's singular values (0 for Δ = 0)."""
    total = float(singular.square().sum())
    return math.sqrt(float(singular[rank:].square().sum()) / total) if total > 0 else 0.0


def total_error(errors: dict[str, tuple[float, float]]) -> float:
    """‖Δ − approximation‖ / ‖Δ‖ over every layer at once, from each layer's (relative error, ‖Δ‖)."""
    change = sum(norm**2 for _, norm in errors.values())
    return math.sqrt(sum((err * norm) ** 2 for err, norm in errors.values()) / change) if change > 0 else 0.0


def kept_in(base: dict[str, Tensor], erased: dict[str, Tensor], dtype: torch.dtype) -> tuple[float, float]:
    """(share of the change kept, rounding error / change) when base and erased weights are both held in `dtype`.

    The change a half-precision copy makes is cast(W_erased) − cast(W_base); against Δ its error is
    e = ‖(cast(W_e) − cast(W_b)) − Δ‖ / ‖Δ‖, summed over every tensor, and the share kept is max(0, 1 − e):
    1 for a cast that keeps Δ exactly, 0 once the rounding is as large as the change itself.
    """
    err = change = 0.0
    for name, new in erased.items():
        old = base[name].detach().double()
        new = new.detach().double()
        delta = new - old
        cast = new.to(dtype).double() - old.to(dtype).double()
        err += float((cast - delta).square().sum())
        change += float(delta.square().sum())
    if change == 0:
        return 1.0, 0.0
    ratio = math.sqrt(err / change)
    return max(0.0, 1.0 - ratio), ratio
