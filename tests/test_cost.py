"""The work an erase counts (esd.cost): images through the denoising network per iteration, by part."""

from __future__ import annotations

import pytest

from esd.config import EraseConfig
from esd.cost import WorkCounter
from esd.erase import erase


def test_the_counter_adds_batches_by_part_and_backward_as_two_forwards():
    work = WorkCounter()
    trained, frozen = work.wrap(lambda x, t, c: x, "trained forward"), work.wrap(lambda x, t, c: x, "frozen targets")
    for _ in range(2):
        trained([0] * 3, None, None)
        frozen([0] * 5, None, None)
        with work.during("adversary"):  # the inner attack's calls count as the adversary's, whatever they call
            trained([0] * 2, None, None)
        work.iterations += 1
    assert work.per_iteration(checkpointing=True) == {
        "frozen targets": 5.0, "trained forward": 3.0, "backward": 6.0, "checkpoint recompute": 3.0,
        "adversary": 2.0, "total": 19.0, "sampler calls": 0.0, "forwards": 3.0}


@pytest.mark.parametrize("sampler_batch", [True, False])
def test_an_erase_counts_its_work_and_batching_cuts_the_samplers_sequential_forwards(tiny_pipe, tmp_path,
                                                                                     sampler_batch):
    cfg = EraseConfig(concept="a red circle", retain=["a blue square"], batch_size=2, ddim_steps=4, iterations=3,
                      grid_steps=0, save_every=0, device="cpu", sampler_batch=sampler_batch, gradient_checkpointing=True,
                      output=str(tmp_path / "run"))
    work = erase(cfg, pipe=tiny_pipe, progress=False).work
    # per iteration: 2 examples, each with its kept prompt: 4 rows trained; ε* of "", the concept and the kept one
    assert (work["trained forward"], work["backward"], work["checkpoint recompute"]) == (4, 8, 4)
    assert work["frozen targets"] == 6
    # the iteration's frozen predictions go in one forward, the trained batch in one: the rest are the sampler's
    assert work["forwards"] == pytest.approx(work["sampler calls"] + 2)
    # each sampler forward takes 2 rows (concept and kept prompt) × 2 (guidance) per example it serves
    per_example_call = 4
    if sampler_batch:
        assert work["sampler"] / (2 * per_example_call) <= work["sampler calls"] <= work["sampler"] / per_example_call
    else:
        assert work["sampler calls"] == pytest.approx(work["sampler"] / per_example_call)
    assert "network evaluations per iteration" in (tmp_path / "run" / "README.md").read_text()
