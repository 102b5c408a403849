"""A Trainer built in the test's own process: a tiny config, a corpus of a few KB, CPU ranks.

``two_ranks`` runs a function on two real ranks (gloo, spawned processes) and hands back what
each returned: the rules that span ranks need a real process group, not a mock of one.

The mutation run (make mutation) maps each function to the tests that call it, by recording
calls in its own process only; ``two_ranks`` brings back what the spawned ranks called, and
``credit_rank_calls`` hands that to it, so that a mutant the ranks run is tested by the
two-rank tests too.
"""

from __future__ import annotations

import os
import random
import signal
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from minigpt import distributed, peak
from minigpt.config import (
    Config,
    DataConfig,
    LoggerConfig,
    ModelConfig,
    OptimizerConfig,
    TrainConfig,
)
from minigpt.distributed import Dist
from minigpt.trainer import Trainer
from tests.conftest import free_port

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "gnomes", "sing"]
PEAK = (1e12, "fixed by the test")  # measuring the machine's peak would take a second per run


def write_corpus(folder: Path) -> Path:
    """Twenty small text files (about 6 KB in all) of seeded random words."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for i in range(20):
        lines = [" ".join(rng.choices(WORDS, k=8)) for _ in range(6)]
        (folder / f"doc{i:02d}.txt").write_text("\n".join(lines) + "\n")
    return folder


def tiny_config(
    root: Path, *, model: dict | None = None, opt: dict | None = None, **train
) -> Config:
    """A one-layer model of width 16 over the corpus in ``root/corpus``; ``train`` overrides the
    loop's keys (a few steps of batch 4 on the CPU in float32, no periodic eval or checkpoint)."""
    model = model or {}
    loop = {
        "max_steps": 4,
        "batch_size": 4,
        "eval_every": 0,
        "eval_steps": 2,
        "ckpt_every": 0,
        "log_every": 1,
        "device": "cpu",
        "dtype": "float32",
        "progress": "off",
        **train,
    }
    return Config(
        model=ModelConfig(**{"n_layer": 1, "n_head": 2, "d_model": 16, "block_size": 16, **model}),
        data=DataConfig(
            source="text",
            paths=[str(root / "corpus" / "*.txt")],
            cache_dir=str(root / "cache"),
            num_proc=1,
        ),
        optimizer=OptimizerConfig(
            **{"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2, "grad_clip": 1.0, **(opt or {})}
        ),
        train=TrainConfig(**loop),
        logger=LoggerConfig(jsonl=True),
    )


def with_train(cfg: Config, **train: Any) -> Config:
    """``cfg`` with some of its loop's keys changed."""
    return replace(cfg, train=replace(cfg.train, **train))


def build_trainer(cfg: Config, run_dir: Path, dist: Dist | None = None) -> Trainer:
    """A Trainer as ``train()`` builds it, minus the run lock and signal handlers."""
    run_dir.mkdir(parents=True, exist_ok=True)
    return Trainer(cfg, run_dir, dist or Dist(), overrides=[])


def signal_in_step(
    trainer: Trainer, step: int, signum: int = signal.SIGTERM, rank: int | None = None
) -> None:
    """Record ``signum`` as the signal handler would, while step ``step`` (1-based) trains, on
    ``rank`` only when one is given: the trainer must stop at the boundary after that step."""
    train_step = trainer._train_step

    def signalled() -> Any:
        if trainer.state.step == step - 1 and rank in (None, trainer.dist.rank):
            trainer.stop.signum = signum
        return train_step()

    trainer._train_step = signalled  # type: ignore[method-assign]


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    """A copy of the model's parameters and buffers."""
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def two_ranks(fn: Callable[[Path, Dist], Any], root: Path) -> tuple[list[Any], set[str]]:
    """``fn(root, dist)`` on ranks 0 and 1 of a gloo group: what each returned, in rank order,
    and the functions mutmut saw them call (empty outside its coverage pass).

    ``fn`` must be importable (a module-level function): the ranks are spawned processes.
    """
    port = free_port()
    mp.spawn(_rank_main, args=(fn, root, port), nprocs=2, join=True)
    out = [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return [o["returned"] for o in out], set().union(*(o["called"] for o in out))


def credit_rank_calls(called: set[str]) -> None:
    """Count the ranks' calls as the running test's, in mutmut's coverage pass."""
    if called:
        from mutmut.state import state  # present whenever a pass recorded calls

        state()._stats.update(called)


def _calls_recorded_by_mutmut() -> set[str]:
    if os.environ.get("MUTANT_UNDER_TEST") != "stats":
        return set()
    from mutmut.state import state

    return set(state()._stats)


def _rank_main(rank: int, fn: Callable[[Path, Dist], Any], root: Path, port: int) -> None:
    torch.set_num_threads(1)  # two ranks on a shared CPU: one thread each
    peak.peak_flops = lambda *args, **kwargs: PEAK
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    dist = Dist(rank=rank, local_rank=rank, world_size=2, local_world_size=2, backend="gloo")
    try:
        returned = fn(root, dist)
        called = _calls_recorded_by_mutmut()
        torch.save({"returned": returned, "called": called}, root / f"rank{rank}.pt")
    finally:
        distributed.teardown(dist)
