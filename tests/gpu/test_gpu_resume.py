"""Exact resume on the GPU: a run stopped and resumed ends where the uninterrupted run ends.

Tolerance: none, bit for bit. Both runs use deterministic kernels
(``torch.use_deterministic_algorithms(True)``, ``CUBLAS_WORKSPACE_CONFIG=:4096:8``): without
them flash attention's backward (atomic adds) and cuBLAS add in an order that changes from one
run to the next, so two *uninterrupted* runs already differ in the last bits. With them a step is a
function of the checkpointed state (weights, AdamW moments, sampler position, step; dropout masks
are reseeded from seed, step and batch slice, so no generator state is kept), so the resumed run
must equal the reference exactly.
"""

from __future__ import annotations

import signal

import torch

from minigpt import checkpoint
from tests.gpu.suite import (
    ON_GPU,
    RESUME_STEPS,
    RESUME_STOP,
    SUITE_MARKS,
    Run,
    cuda_only,
)

pytestmark = SUITE_MARKS


def drift(final: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict[str, float]:
    """The tensors that differ, with their largest absolute difference."""
    return {
        name: float((final[name].double() - want.double()).abs().max())
        for name, want in expected.items()
        if not torch.equal(final[name], want)
    }


def test_interrupted_and_resumed_run_is_bit_identical_to_the_uninterrupted_one(
    resume_reference: Run, interrupted_runs: tuple[Run, Run]
) -> None:
    stopped, resumed = interrupted_runs
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-4000:]
    assert f"stopped by SIGTERM at step {RESUME_STOP}" in stopped.stderr
    resumed.succeeded()
    assert f"at step {RESUME_STOP}" in resumed.stdout  # resumed from the stop's own checkpoint

    info = resumed.info()
    assert info["status"] == "completed" and info["steps"] == RESUME_STEPS
    assert info["resumed_from"] and info["device"] == ("cuda:0" if ON_GPU else "cpu")
    final, expected = resumed.checkpoint()["model"], resume_reference.checkpoint()["model"]
    assert not drift(final, expected), f"resume drifted (max |diff|): {drift(final, expected)}"
    # Every step logged once, with the reference's losses (log and eval steps align with the stop).
    steps = [e["step"] for e in resumed.metrics()]
    assert steps == [e["step"] for e in resume_reference.metrics()]
    train = [(e["step"], e["train/loss"]) for e in resumed.train_events()]
    assert train == [(e["step"], e["train/loss"]) for e in resume_reference.train_events()]
    assert resumed.val_losses() == resume_reference.val_losses()


@cuda_only("a checkpoint loaded onto the GPU")
def test_a_checkpoint_written_on_the_gpu_holds_no_generator_state(resume_reference: Run) -> None:
    """The exact resume above needs no CUDA (or CPU) generator state: dropout is reseeded at
    every micro-step, so a checkpoint loaded onto the GPU holds tensors of the run alone."""
    path = resume_reference.run_dir / "checkpoints" / checkpoint.LAST
    state = checkpoint.load(path, map_location=torch.device("cuda:0"))
    assert state["model"]["transformer.wte.weight"].is_cuda
    assert "rng" not in state
