"""Paper Eq. 5 pinned on small tensors."""

import torch

from esd.loss import esd_loss, esd_target, eta_from_2025

NULL = torch.tensor([1.0, 2.0])
CONCEPT = torch.tensor([3.0, 1.0])


def test_target_is_negative_guidance_away_from_concept():
    # ε*(x,t) − η(ε*(x,c,t) − ε*(x,t)) = [1, 2] − 1·([3, 1] − [1, 2]) = [−1, 3]
    assert torch.equal(esd_target(NULL, CONCEPT, eta=1.0), torch.tensor([-1.0, 3.0]))
    assert torch.equal(esd_target(NULL, CONCEPT, eta=2.0), torch.tensor([-3.0, 4.0]))
    # η = 0: the target is the unconditional prediction (the concept is simply ignored)
    assert torch.equal(esd_target(NULL, CONCEPT, eta=0.0), NULL)


def test_target_with_erase_from_context_starts_from_the_context():
    context = torch.tensor([0.5, -1.0])
    # ε*(x,f,t) − η(ε*(x,c,t) − ε*(x,t)) = [0.5, −1] − ([3, 1] − [1, 2]) = [−1.5, 0]
    assert torch.equal(esd_target(NULL, CONCEPT, 1.0, eps_context=context), torch.tensor([-1.5, 0.0]))


def test_loss_is_mean_squared_error_and_does_not_backprop_into_target():
    trained = torch.zeros(2, requires_grad=True)
    target = esd_target(NULL, CONCEPT, 1.0).requires_grad_()
    loss = esd_loss(trained, target)
    assert loss.item() == 5.0  # ((0+1)² + (0−3)²) / 2
    loss.backward()
    assert torch.equal(trained.grad, torch.tensor([1.0, -3.0]))  # 2(en − target)/2
    assert target.grad is None


def test_2025_eta_convention_maps_onto_the_paper_eta():
    eta_2025 = 2.5
    target_2025 = CONCEPT - eta_2025 * (CONCEPT - NULL)  # the 2025 scripts' formula
    assert torch.allclose(esd_target(NULL, CONCEPT, eta_from_2025(eta_2025)), target_2025)
