"""The ESD objective as pure functions (paper Eq. 5).

Symbols follow the paper: eps_null = ε*(x_t, t) (frozen model, empty prompt), eps_concept =
ε*(x_t, c, t) (frozen model, concept prompt), eps_trained = ε_θ(x_t, c, t), eta = η.
"""

from __future__ import annotations

import torch
from torch import Tensor


def esd_target(eps_null: Tensor, eps_concept: Tensor, eta: float, eps_context: Tensor | None = None) -> Tensor:
    """Eq. 5: ε*(x_t, t) − η · (ε*(x_t, c, t) − ε*(x_t, t)).

    Negative classifier-free guidance away from the concept c. With `eps_context` = ε*(x_t, f, t)
    (the 2025 code's erase-from mode) the guidance starts from the context f instead of the empty
    prompt: ε*(x_t, f, t) − η · (ε*(x_t, c, t) − ε*(x_t, t)).
    The formula is linear in the predictions, so it holds for v-prediction outputs as well.
    """
    start = eps_null if eps_context is None else eps_context
    return start - eta * (eps_concept - eps_null)


def esd_loss(eps_trained: Tensor, target: Tensor) -> Tensor:
    """Mean squared error between ε_θ(x_t, c, t) and the (detached) Eq. 5 target."""
    return torch.nn.functional.mse_loss(eps_trained.float(), target.detach().float())


def eta_from_2025(eta_2025: float) -> float:
    """The 2025 official scripts write the target as e_c − η'(e_c − e_0), i.e. η' = η + 1."""
    return eta_2025 - 1.0
