"""The Trainer's rules, checked in this process on a one-layer model (two spawned ranks where a
rule spans ranks): clipping, the schedule, the batch split, dropout, resume, evaluation, best
checkpoints, skipped steps and accumulation."""

from __future__ import annotations

import math
import random
import re
import signal
import types
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as tdist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from minigpt import checkpoint, peak, runfolder
from minigpt.batches import BatchSampler
from minigpt.config import as_dict
from minigpt.distributed import Dist
from minigpt.optim import lr_at
from minigpt.runlock import RunFolderError
from minigpt.signals import StopRequested
from minigpt.trainer import Trainer, TrainingError, _applied_lr, _dropout_seed, _ppl
from tests.conftest import free_port, read_metrics
from tests.unit.trainer_setup import (
    PEAK,
    build_trainer,
    credit_rank_calls,
    signal_in_step,
    tiny_config,
    two_ranks,
    weights,
    with_train,
    write_corpus,
)

# Float32 sums taken in another order (DDP's all-reduce, one big batch) differ in the last bits,
# and Adam scales a near-zero gradient's noise up to ~1e-6 of update; a wrong batch or dropout
# mask moves weights by ~lr (1e-3 to 1e-2) per step.
CLOSE = {"rtol": 1e-4, "atol": 1e-5}


@pytest.fixture(autouse=True)
def _fixed_peak(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peak, "peak_flops", lambda *args, **kwargs: PEAK)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    write_corpus(tmp_path / "corpus")
    return tmp_path


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], **tol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if tol:
            torch.testing.assert_close(a[k], b[k], **tol, msg=lambda m, k=k: f"{k}: {m}")
        else:
            assert torch.equal(a[k], b[k]), f"{k} differs"


# ---------------------------------------------------------------- one step


def _step_recording_grad_norms(trainer: Trainer) -> tuple[float, list[float]]:
    """One training step; the norm it returns and the gradient norm each optimizer step saw."""
    seen: list[float] = []
    step = trainer.optimizer.step

    def recording_step(*args: Any, **kwargs: Any) -> Any:
        grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    _, grad_norm, _ = trainer._train_step()
    return grad_norm, seen


def test_grad_clip_bounds_the_update(root: Path) -> None:
    clip = 1e-3
    trainer = build_trainer(tiny_config(root, opt={"grad_clip": clip}), root / "run")
    grad_norm, seen = _step_recording_grad_norms(trainer)
    assert grad_norm > 10 * clip  # the norm before clipping: clipping had work to do
    assert len(seen) == 1 and seen[0] <= clip * (1 + 1e-4), seen
    assert all(p.grad is None for p in trainer.model.parameters())  # freed, not zero-filled


def test_grad_clip_zero_means_no_clipping(root: Path) -> None:
    trainer = build_trainer(tiny_config(root, opt={"grad_clip": 0.0}), root / "run")
    grad_norm, seen = _step_recording_grad_norms(trainer)
    assert grad_norm > 1.0 and seen == [pytest.approx(grad_norm, rel=1e-5)]


def test_every_param_group_gets_the_scheduled_lr(root: Path) -> None:
    cfg = tiny_config(root, opt={"warmup_steps": 3}, max_steps=5)
    trainer = build_trainer(cfg, root / "run")
    assert len(trainer.optimizer.param_groups) > 1  # decayed and not: a group left behind shows
    for step in range(3):  # warm-up: the lr moves every step
        trainer.state.step = step
        _, _, lr = trainer._train_step()
        expected = lr_at(step, cfg.optimizer, cfg.train.max_steps)
        assert lr == pytest.approx(expected, rel=1e-12)
        assert [g["lr"] for g in trainer.optimizer.param_groups] == [lr] * 2


def test_logged_lr_is_the_one_the_optimizer_used(root: Path) -> None:
    cfg = tiny_config(root, opt={"warmup_steps": 2}, max_steps=4)
    trainer = build_trainer(cfg, root / "run")
    used: list[float] = []
    step = trainer.optimizer.step

    def recording_step(*args: Any, **kwargs: Any) -> Any:
        rates = {g["lr"] for g in trainer.optimizer.param_groups}
        assert len(rates) == 1, rates
        used.append(rates.pop())
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    trainer.fit()
    logged = [e["lr"] for e in read_metrics(root / "run") if "lr" in e]
    assert logged == pytest.approx(used, rel=1e-12) and len(logged) == 4
    assert used[0] != used[1] != used[3]  # warm-up then decay: the check can see a wrong step


def test_metrics_follow_the_log_and_eval_schedule_and_agree_with_each_other(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Train lines every log_every steps and at the last, evaluations every eval_every steps and
    at the last, checkpoints every ckpt_every steps and at each evaluation, samples printed
    every sample_every steps and at the last (and logged at each evaluation too); perplexity is
    exp(loss); throughput counts the tokens each step really saw."""
    cfg = tiny_config(
        root,
        max_steps=5,
        log_every=2,
        eval_every=3,
        ckpt_every=2,
        sample_every=2,
        keep_last=9,
        progress="lines",  # printed samples reach stdout
    )
    trainer = build_trainer(cfg, root / "run")
    returned = trainer.fit()
    out = capsys.readouterr().out
    printed = re.findall(r"--- sample at step (\d+) ---", out)
    assert [int(s) for s in printed] == [2, 4, 5]
    assert "non-finite" not in out  # the skip warning is for skipped steps only
    saved = checkpoint.step_checkpoints(checkpoint.checkpoint_dir(root / "run"))
    assert [int(p.stem.removeprefix("step_")) for p in saved] == [2, 3, 4, 5]
    entries: dict[int, dict[str, Any]] = {}
    for e in read_metrics(root / "run"):  # a step's samples are a line of their own
        entries.setdefault(e["step"], {}).update(e)
    assert [s for s, e in entries.items() if "sample" in e] == [2, 3, 4, 5]
    train = {s: e for s, e in entries.items() if "train/loss" in e}
    val = {s: e for s, e in entries.items() if "val/loss" in e}
    assert list(train) == [2, 4, 5] and list(val) == [3, 5]
    for e in val.values():
        assert e["val/perplexity"] == pytest.approx(math.exp(e["val/loss"]), rel=1e-12)
    for e in train.values():
        assert isinstance(e["grad_norm"], float) and e["grad_norm"] > 0
        per_step = e["tokens_per_sec"] * e["step_time_ms"] / 1e3
        assert per_step == pytest.approx(4 * 16, rel=1e-6)  # batch 4 x block 16, one rank
        mfu = trainer.flops_per_token * e["tokens_per_sec"] / PEAK[0]
        assert e["mfu"] == pytest.approx(mfu, rel=1e-9)
        assert (e["tokens_seen"], e["skipped_steps"]) == (e["step"] * 4 * 16, 0)
    assert returned == val[5]["val/loss"]
    assert isinstance(trainer.startup_s, float) and trainer.startup_s > 0


def test_dropout_seeds_are_64_bit_and_differ_by_seed_step_and_slice() -> None:
    seeds = {_dropout_seed(s, t, p) for s in range(3) for t in range(3) for p in range(3)}
    assert len(seeds) == 27
    assert max(seeds) >= 2**32 and all(0 <= x < 2**64 for x in seeds)


def test_global_batch_splits_rank_major() -> None:
    data = np.arange(1000, dtype=np.uint16)  # token i is i: a window names its start
    sampler = BatchSampler(data, block_size=4, global_batch=8, seed=3)
    for step in range(3):
        parts = [
            sampler.batch(step, rank, 2, micro, 2)[0] for rank in range(2) for micro in range(2)
        ]
        starts = torch.cat(parts)[:, 0].tolist()
        assert starts == sampler.global_offsets(step).tolist()


def _embedding_dropout_masks(trainer: Trainer) -> list[torch.Tensor]:
    masks: list[torch.Tensor] = []
    drop = trainer.model.transformer.drop
    drop.register_forward_hook(lambda module, inputs, out: masks.append(out == 0))
    return masks


def test_dropout_masks_differ_between_steps(root: Path) -> None:
    cfg = tiny_config(root, model={"dropout": 0.5})
    trainer = build_trainer(cfg, root / "run")
    x, y = trainer.sampler.batch(0, 0, 1, 0, 1)
    trainer.sampler.batch = lambda *args: (x, y)  # the same tokens at every step
    masks = _embedding_dropout_masks(trainer)
    for step in range(2):
        trainer.state.step = step
        trainer._train_step()
    assert masks[0].float().mean() > 0.3  # dropout=0.5 is at work
    assert not torch.equal(masks[0], masks[1]), "step 1 reused step 0's dropout mask"

    again = build_trainer(cfg, root / "again")  # the same (seed, step, slice): the same mask
    again.sampler.batch = lambda *args: (x, y)
    masks_again = _embedding_dropout_masks(again)
    again._train_step()
    assert torch.equal(masks_again[0], masks[0])


def test_grad_accum_matches_one_big_batch(root: Path) -> None:
    cfg = tiny_config(root, max_steps=2, batch_size=4, grad_accum=2)
    accumulated = build_trainer(cfg, root / "accum")
    big = build_trainer(with_train(cfg, batch_size=8, grad_accum=1), root / "big")
    start = weights(big)
    reported: dict[str, list[float]] = {"accumulated": [], "big": []}  # loss, norm, loss, norm
    for name, trainer in (("accumulated", accumulated), ("big", big)):
        for step in range(2):
            trainer.state.step = step
            loss, grad_norm, _ = trainer._train_step()
            reported[name] += [float(loss), grad_norm]
    # The loss and gradient are means over the global batch (Adam alone would hide a sum).
    assert reported["accumulated"] == pytest.approx(reported["big"], rel=1e-5)
    _assert_same(weights(accumulated), weights(big), **CLOSE)
    assert not torch.allclose(weights(big)["lm_head.weight"], start["lm_head.weight"], **CLOSE)


# ---------------------------------------------------------------- non-finite steps


class _NanOnce(torch.nn.Module):
    """The model, whose loss is NaN at the steps in ``bad``."""

    def __init__(self, trainer: Trainer, bad: set[int]) -> None:
        super().__init__()
        self.inner, self.trainer, self.bad = trainer.step_model, trainer, bad

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> Any:
        logits, loss = self.inner(x, y)
        if self.trainer.state.step in self.bad:
            loss = loss * math.nan
        return logits, loss


def _optimizer_tensors(trainer: Trainer) -> dict[str, torch.Tensor]:
    state = trainer.optimizer.state_dict()["state"]
    return {f"{i}.{k}": v.clone() for i, s in state.items() for k, v in s.items()}


def test_non_finite_step_is_skipped(root: Path) -> None:
    cfg = tiny_config(root, max_steps=6, max_bad_steps=2)
    trainer = build_trainer(cfg, root / "run")
    trainer.step_model = _NanOnce(trainer, bad={1, 3, 4})

    def step() -> float:
        _, grad_norm, _ = trainer._train_step()
        trainer.state.step += 1
        return grad_norm

    assert math.isfinite(step())
    before, opt_before = weights(trainer), _optimizer_tensors(trainer)
    assert not math.isfinite(step())  # step 1: NaN
    _assert_same(weights(trainer), before)
    _assert_same(_optimizer_tensors(trainer), opt_before)
    assert (trainer.state.bad_steps, trainer.state.skipped_steps) == (1, 1)

    assert math.isfinite(step())  # step 2: a good step resets the count of bad ones in a row
    assert (trainer.state.bad_steps, trainer.state.skipped_steps) == (0, 1)
    assert not any(torch.equal(weights(trainer)[k], before[k]) for k in ["lm_head.weight"])

    assert not math.isfinite(step())  # step 3: one bad step in a row is tolerated
    assert (trainer.state.bad_steps, trainer.state.skipped_steps) == (1, 2)
    with pytest.raises(TrainingError) as err:
        step()  # step 4: max_bad_steps=2 in a row stop the run
    assert str(err.value) == (
        "2 consecutive steps had a non-finite gradient at step 4; lower optimizer.lr or raise "
        "optimizer.warmup_steps (the last good checkpoint is kept)"
    )
    assert all(torch.isfinite(w).all() for w in weights(trainer).values())


# ---------------------------------------------------------------- resume and checkpoints


def _scramble_global_rngs() -> None:
    torch.manual_seed(random.SystemRandom().randrange(2**32))
    np.random.seed(random.SystemRandom().randrange(2**32))
    random.seed(random.SystemRandom().randrange(2**32))
    torch.rand(7), np.random.rand(3), random.random()


def test_resume_needs_no_global_rng_state(root: Path) -> None:
    cfg = tiny_config(root, model={"dropout": 0.2}, max_steps=6)
    straight = build_trainer(cfg, root / "straight")
    straight.fit()

    first = build_trainer(cfg, root / "run")
    signal_in_step(first, 3, signal.SIGUSR2)
    with pytest.raises(StopRequested) as stop:
        first.fit()
    assert str(stop.value) == "stopped by SIGUSR2 at step 3"
    saved = checkpoint.load(root / "run" / "checkpoints" / checkpoint.LAST)
    assert saved["train_state"]["step"] == 3 and "rng" not in saved

    resumed = build_trainer(cfg, root / "run")  # resume=auto: continues from last.pt
    assert resumed.state.step == 3
    _scramble_global_rngs()
    resumed.fit()
    _assert_same(weights(resumed), weights(straight))


def test_a_finished_run_resumes_as_complete_and_a_lower_max_steps_is_refused(root: Path) -> None:
    cfg = tiny_config(root, max_steps=2)
    first = build_trainer(cfg, root / "run")
    first.logger_run_id = "wandb-id-1"  # as a tracker sets it; a resumed run keeps logging there
    first.fit()
    again = build_trainer(cfg, root / "run")
    assert again.state.step == 2 and again.logger_run_id == "wandb-id-1"
    assert again.resumed_from == root / "run" / "checkpoints" / checkpoint.LAST
    _assert_same(weights(again), weights(first))
    resumed, saved = (t.optimizer.state_dict()["state"] for t in (again, first))
    assert resumed.keys() == saved.keys()
    for key in saved:  # Adam's moments and step count come back too
        for name, value in saved[key].items():
            assert torch.equal(resumed[key][name], value), (key, name)
    with pytest.raises(RunFolderError) as err:
        build_trainer(with_train(cfg, max_steps=1), root / "run")
    assert str(err.value) == (
        f"train.max_steps=1 is below step 2, which the run in {root / 'run'} has reached; give "
        "train.max_steps=2 or more, or give a new run its own hydra.run.dir"
    )


def test_a_checkpoint_holds_what_resume_generate_and_export_read(root: Path) -> None:
    trainer = build_trainer(tiny_config(root, max_steps=1), root / "run")
    trainer.fit()
    saved = checkpoint.load(root / "run" / "checkpoints" / checkpoint.LAST)
    assert set(saved) - {"format", "version"} == {
        "model",
        "model_config",
        "tokenizer",
        "optimizer",
        "sampler",
        "train_state",
        "config",
        "data",
        "logger_run_id",
    }  # no "scaler": float32 on the CPU has no loss scaling
    assert saved["model_config"] == asdict(trainer.model.config)
    assert saved["tokenizer"] == trainer.corpus.tokenizer.state()
    assert saved["config"] == as_dict(trainer.cfg)
    assert saved["data"] == runfolder.data_summary(trainer.corpus.meta)
    assert saved["train_state"] == asdict(trainer.state) and saved["train_state"]["step"] == 1
    assert saved["sampler"] == trainer.sampler.state_dict()


def test_evaluate_is_the_mean_loss_over_the_validation_batches(root: Path) -> None:
    trainer = build_trainer(tiny_config(root, eval_steps=3), root / "run")
    with torch.no_grad():
        losses = [float(trainer.model(x, y)[1]) for x, y in trainer.val_batches]
    assert len(losses) == 3
    assert trainer.evaluate() == pytest.approx(sum(losses) / 3, rel=1e-6)


def test_groups_at_different_rates_are_refused_and_perplexity_overflows_to_inf() -> None:
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD([{"params": [model.weight], "lr": 0.1}, {"params": [model.bias]}], 0.2)
    with pytest.raises(RuntimeError) as err:
        _applied_lr(opt)
    assert str(err.value) == "the optimizer's parameter groups disagree on the lr: [0.1, 0.2]"
    assert _ppl(2.0) == math.exp(2.0) and _ppl(49.9) == math.exp(49.9)
    assert _ppl(50.0) == math.inf  # exp(50) is finite, but such a run has diverged


def test_best_checkpoint_keeps_the_lowest_val_loss(root: Path) -> None:
    trainer = build_trainer(tiny_config(root, keep_last=5), root / "run")
    folder = root / "run" / "checkpoints"
    for step, val_loss in [(1, 2.0), (2, 1.5), (3, 1.8), (4, None), (5, 1.5)]:
        trainer.state.step = step
        trainer._checkpoint(val_loss)
    best = checkpoint.load(folder / checkpoint.BEST)
    assert best["train_state"]["step"] == 2  # a tie (step 5) is no new best
    assert trainer.state.best_val_loss == 1.5
    assert checkpoint.load(folder / checkpoint.LAST)["train_state"]["step"] == 5


def test_a_stop_right_after_a_checkpoint_writes_it_once(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = build_trainer(tiny_config(root), root / "run")
    steps: list[int] = []
    save_step = checkpoint.save_step
    monkeypatch.setattr(
        checkpoint,
        "save_step",
        lambda state, *a, **k: steps.append(a[1]) or save_step(state, *a, **k),
    )
    trainer.state.step = 3
    trainer._checkpoint(None)
    trainer.stop.signum = signal.SIGTERM
    with pytest.raises(StopRequested):
        trainer._stop_if_requested()
    assert steps == [3]


def test_evaluate_in_bfloat16_autocasts_on_the_training_device(root: Path) -> None:
    """bf16 autocast on the CPU: close to the float32 loss of the same weights, not equal."""
    full = build_trainer(tiny_config(root, eval_steps=3), root / "fp32")
    half = build_trainer(tiny_config(root, eval_steps=3, dtype="bfloat16"), root / "bf16")
    for key, value in weights(full).items():
        assert torch.equal(value, weights(half)[key]), key
    expected, got = full.evaluate(), half.evaluate()
    assert got == pytest.approx(expected, rel=2e-2) and got != expected
    (loss, _, _), (loss16, _, _) = full._train_step(), half._train_step()
    assert float(loss16) == pytest.approx(float(loss), rel=2e-2) and float(loss16) != float(loss)


def test_a_signal_during_step_2_stops_the_run_after_it_with_its_checkpoint(root: Path) -> None:
    trainer = build_trainer(tiny_config(root, max_steps=5), root / "run")
    signal_in_step(trainer, 2)
    with pytest.raises(StopRequested) as request:
        trainer.fit()
    assert str(request.value) == "stopped by SIGTERM at step 2"
    last = checkpoint.load(root / "run" / "checkpoints" / checkpoint.LAST)
    assert last["train_state"]["step"] == trainer.state.step == 2


def test_a_step_without_dropout_leaves_the_global_rng_alone(root: Path) -> None:
    """Dropout's masks are reseeded per micro-step; with no dropout nothing is drawn or reseeded."""
    trainer = build_trainer(tiny_config(root, grad_accum=2), root / "run")
    torch.manual_seed(123)
    before = torch.get_rng_state()
    trainer._train_step()
    assert torch.equal(torch.get_rng_state(), before)


def test_the_step_loss_is_the_mean_of_its_micro_batches(root: Path) -> None:
    trainer = build_trainer(tiny_config(root, grad_accum=2), root / "run")
    with torch.no_grad():
        losses = [
            float(trainer.model(*trainer.sampler.batch(0, 0, 1, micro, 2))[1]) for micro in (0, 1)
        ]
    loss, _, _ = trainer._train_step()
    assert float(loss) == pytest.approx(sum(losses) / 2, rel=1e-6)


def test_a_compiled_ddp_model_still_skips_the_all_reduce_of_early_micro_steps(root: Path) -> None:
    """torch.compile wraps DDP in a module whose ``_orig_mod`` is the DDP wrapper: ``no_sync``
    must be found through it (a one-rank gloo group stands in for a job)."""
    trainer = build_trainer(tiny_config(root), root / "run")
    tdist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        ddp = DistributedDataParallel(trainer.model)
        trainer.step_model = types.SimpleNamespace(_orig_mod=ddp)  # what compile's wrapper holds
        with trainer.parallel.micro_step(trainer.step_model, sync=False):
            assert ddp.require_backward_grad_sync is False
        assert ddp.require_backward_grad_sync is True
        with trainer.parallel.micro_step(trainer.step_model, sync=True):
            assert ddp.require_backward_grad_sync is True
    finally:
        tdist.destroy_process_group()


def test_a_resume_checkpoint_that_does_not_load_is_refused_with_its_reason(root: Path) -> None:
    bad = root / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(checkpoint.CheckpointError) as expected:
        checkpoint.load(bad)
    with pytest.raises(RunFolderError) as err:
        build_trainer(replace(tiny_config(root), resume=str(bad)), root / "run")
    assert str(err.value) == str(expected.value)


def test_an_unloadable_last_checkpoint_falls_back_to_the_newest_step_and_says_so(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tiny_config(root, max_steps=2, ckpt_every=1, keep_last=2)
    build_trainer(cfg, root / "run").fit()
    last = root / "run" / "checkpoints" / checkpoint.LAST
    last.unlink()
    last.write_bytes(b"torn")
    capsys.readouterr()
    newest = checkpoint.step_checkpoints(last.parent)[-1]
    trainer = build_trainer(cfg, root / "run")
    assert trainer.resumed_from == newest and trainer.state.step == 2
    assert f"resuming from {newest.name}, the newest that loads" in capsys.readouterr().out


def test_a_resume_into_another_model_shape_names_the_checkpoint(root: Path) -> None:
    build_trainer(tiny_config(root, max_steps=1), root / "run").fit()
    path = root / "run" / "checkpoints" / checkpoint.LAST
    cfg = tiny_config(root, max_steps=1)
    with pytest.raises(RunFolderError) as err:
        build_trainer(replace(cfg, model=replace(cfg.model, n_layer=2)), root / "run")
    assert str(err.value).startswith(f"resume={path} holds a model of another shape")


def test_old_checkpoint_with_rng_states_still_resumes(root: Path) -> None:
    cfg = tiny_config(root, max_steps=2)
    trainer = build_trainer(cfg, root / "run")
    trainer.state.step = 1
    state = trainer._checkpoint_state()
    state["rng"] = {"per_rank": [{"torch": torch.get_rng_state()}]}  # as runs before saved
    checkpoint.save_step(state, root / "run" / "checkpoints", 1, keep_last=1, best=False)
    resumed = build_trainer(cfg, root / "run")
    assert resumed.state.step == 1
    assert resumed.fit() > 0


# ---------------------------------------------------------------- two ranks


def _accum_config(root: Path, **train: Any) -> Any:
    """Global batch 8 with dropout, evaluated each step over 3 val batches (2 ranks: 2 and 1)."""
    cfg = tiny_config(
        root, model={"dropout": 0.1}, batch_size=2, max_steps=3, eval_every=1, eval_steps=3
    )
    return with_train(cfg, **train)


def _dropout_config(root: Path, **train: Any) -> Any:
    return with_train(tiny_config(root, model={"dropout": 0.3}, batch_size=2, max_steps=3), **train)


def _on_two_ranks(root: Path, dist: Dist) -> dict[str, Any]:
    """Each rank's side of the two-rank runs (a spawned process)."""
    out: dict[str, Any] = {}
    accum = build_trainer(_accum_config(root, grad_accum=2), root / "accum", dist)
    out["val_at_start"] = accum.evaluate()
    out["allreduce_steps"] = []

    def counting_allreduce(state, bucket):  # unannotated: DDP accepts only GradBucket's there
        out["allreduce_steps"].append(accum.state.step)
        return default_hooks.allreduce_hook(state, bucket)

    accum.step_model.register_comm_hook(None, counting_allreduce)  # None: the default group
    accum.fit()
    out["accum"], out["best_val_loss"] = weights(accum), accum.state.best_val_loss
    dropout = build_trainer(_dropout_config(root, grad_accum=1), root / "dropout", dist)
    dropout.fit()
    out["dropout"] = weights(dropout)
    stopped = build_trainer(_accum_config(root, eval_every=0), root / "stopped", dist)
    signal_in_step(stopped, 2, rank=1)  # rank 1 only, during step 2
    try:
        stopped.fit()
    except StopRequested as request:
        out["stopped"] = str(request)
    last = checkpoint.load(root / "stopped" / "checkpoints" / checkpoint.LAST)
    out["saved_at_stop"] = last["train_state"]["step"]
    resumed = build_trainer(_accum_config(root, eval_every=0), root / "stopped", dist)
    resumed.fit()  # every rank reads the checkpoint rank 0 chose
    out["resumed"] = weights(resumed)
    return out


@pytest.fixture(scope="module")
def _spawned_ranks(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, list[dict[str, Any]], set[str]]:
    root = tmp_path_factory.mktemp("two_ranks")
    write_corpus(root / "corpus")
    return root, *two_ranks(_on_two_ranks, root)


@pytest.fixture
def two_rank_runs(
    _spawned_ranks: tuple[Path, list[dict[str, Any]], set[str]],
) -> tuple[Path, list[dict[str, Any]]]:
    """The two-rank runs, spawned once per module; each test that reads them is credited with
    what the ranks called (see trainer_setup)."""
    root, ranks, called = _spawned_ranks
    credit_rank_calls(called)
    return root, ranks


@pytest.mark.distributed
def test_evaluate_averages_over_all_ranks(two_rank_runs: tuple[Path, list]) -> None:
    root, ranks = two_rank_runs
    one = build_trainer(_accum_config(root, grad_accum=4), root / "one_rank_eval")
    expected = one.evaluate()  # the mean over the 3 batches, not over the ranks' shares
    assert [r["val_at_start"] for r in ranks] == pytest.approx([expected] * 2, rel=1e-6)


@pytest.mark.distributed
def test_best_checkpoint_is_the_lowest_val_loss_agreed_by_all_ranks(
    two_rank_runs: tuple[Path, list],
) -> None:
    root, ranks = two_rank_runs
    metrics = read_metrics(root / "accum")
    val = {e["step"]: e["val/loss"] for e in metrics if "val/loss" in e}
    assert sorted(val) == [1, 2, 3]
    for e in (e for e in metrics if "train/loss" in e):  # both ranks' tokens: 8 x 16 a step
        assert e["tokens_per_sec"] * e["step_time_ms"] / 1e3 == pytest.approx(8 * 16, rel=1e-6)
        assert e["tokens_seen"] == e["step"] * 8 * 16
    lowest = min(val.values())
    assert [r["best_val_loss"] for r in ranks] == [lowest, lowest]
    best = checkpoint.load(root / "accum" / "checkpoints" / checkpoint.BEST)
    assert val[best["train_state"]["step"]] == lowest
    one = build_trainer(_accum_config(root, grad_accum=4), root / "one_rank_best")
    one.model.load_state_dict(best["model"])
    assert one.evaluate() == pytest.approx(lowest, rel=1e-6)  # the loss of all 3 batches


@pytest.mark.distributed
def test_two_ranks_accumulating_match_one_rank_accumulating_more(
    two_rank_runs: tuple[Path, list],
) -> None:
    """2 ranks x 2 micro-steps = 1 rank x 4, dropout included: each slice of the global batch
    meets the same data and the same dropout mask whichever rank draws it."""
    root, ranks = two_rank_runs
    # Evaluating only at the end changes no weight, and saves two evaluations and samples.
    one = build_trainer(_accum_config(root, grad_accum=4, eval_every=0), root / "one_rank")
    one.fit()
    _assert_same(ranks[0]["accum"], ranks[1]["accum"])
    _assert_same(ranks[0]["accum"], weights(one), **CLOSE)
    # ... and only the last micro-step of each all-reduces (one bucket: the model is tiny).
    assert [r["allreduce_steps"] for r in ranks] == [[0, 1, 2]] * 2


@pytest.mark.distributed
def test_dropout_masks_match_across_world_sizes(two_rank_runs: tuple[Path, list]) -> None:
    root, ranks = two_rank_runs
    one = build_trainer(_dropout_config(root, grad_accum=2), root / "one_rank_dropout")
    one.fit()
    _assert_same(ranks[0]["dropout"], weights(one), **CLOSE)


@pytest.mark.distributed
def test_a_signal_to_one_rank_stops_both_at_the_same_step_with_a_checkpoint(
    two_rank_runs: tuple[Path, list],
) -> None:
    """Only rank 1 is signalled (during step 2): the step-boundary all-reduce stops both after
    step 2, and rank 0 has written that step's checkpoint first."""
    root, ranks = two_rank_runs
    assert [r.get("stopped") for r in ranks] == ["stopped by SIGTERM at step 2"] * 2
    assert [r["saved_at_stop"] for r in ranks] == [2, 2]  # what last.pt held once both stopped


@pytest.mark.distributed
def test_a_stopped_two_rank_run_resumes_on_both_ranks_to_the_uninterrupted_weights(
    two_rank_runs: tuple[Path, list],
) -> None:
    root, ranks = two_rank_runs
    one = build_trainer(_accum_config(root, eval_every=0, grad_accum=2), root / "one_uninterrupted")
    one.fit()
    _assert_same(ranks[0]["resumed"], ranks[1]["resumed"])
    _assert_same(ranks[0]["resumed"], weights(one), **CLOSE)
