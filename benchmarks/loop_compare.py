"""train.py's training step against a plain nanoGPT-style loop, interleaved in one process.

    python benchmarks/loop_compare.py a                  # config (a), 8 rounds of 5 steps each
    python benchmarks/loop_compare.py b --rounds 4 --steps 2
    python benchmarks/loop_compare.py a train.compile=false   # any overrides after the preset

Separate whole runs on a shared machine swing by tens of percent with the neighbours; two loops
timed in alternating rounds of the same process see the same neighbours, so their *ratio* holds.
Each loop trains its own copy of the same initial model on the same batches:

- ``trainer``: the real ``Trainer._train_step`` with the config as train.py composes it (its
  optimizer, autocast, clipping, ``train.compile``), the step counter advanced as the loop does.
- ``plain``: nanoGPT's ``train.py`` loop on CPU: ``torch.optim.AdamW`` over nanoGPT's two decay
  groups with no ``fused``/``foreach`` argument (nanoGPT asks for ``fused`` on CUDA only), the
  eager model, ``loss.backward()``, ``clip_grad_norm_``, ``step``, ``zero_grad(set_to_none=True)``.

Per loop the figure is the median over rounds of the mean step time in the round; the ratio is
plain / trainer (above 1: train.py's step is faster). One JSON line goes to results.jsonl.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import PRESETS, append_result, compose_config  # noqa: E402
from train_throughput import expand, trainer_step_fn  # noqa: E402

from minigpt import distributed  # noqa: E402
from minigpt.trainer import Trainer  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """A preset and Hydra overrides, in any order."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("items", nargs="*", help=f"presets ({', '.join(PRESETS)}) or key=value")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per loop first")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed steps per loop per round")
    p.add_argument("--no-save", action="store_true", help="do not append to results.jsonl")
    return p.parse_args(argv)


def plain_loop(trainer: Trainer) -> Callable[[], None]:
    """nanoGPT's CPU step on a copy of the trainer's initial model, fed the trainer's batches."""
    model = copy.deepcopy(trainer.model)
    cfg = trainer.cfg
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.optimizer.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=cfg.optimizer.lr, betas=tuple(cfg.optimizer.betas))
    accum, step = cfg.train.grad_accum, [0]

    def run() -> None:
        for micro in range(accum):
            x, y = trainer.sampler.batch(step[0], 0, 1, micro, accum)
            _, loss = model(x.to(trainer.device), y.to(trainer.device))
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step[0] += 1

    return run


def timed(run: Callable[[], None], steps: int, device: torch.device) -> float:
    """Mean seconds per step over ``steps`` steps (each step ends in a host sync already)."""
    start = time.perf_counter()
    for _ in range(steps):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Build the Trainer and the plain loop, alternate timed rounds, print the ratio."""
    args = parse_args(argv)
    overrides = expand(args.items) + ["logger=none", "resume=never"]
    cfg = compose_config(overrides)
    dist = distributed.setup(cfg.train.device, cfg.cluster.backend, cfg.cluster.init_timeout_s)
    with tempfile.TemporaryDirectory(prefix="minigpt-bench-") as run_dir:
        trainer = Trainer(cfg, Path(run_dir), dist, overrides)
        loops = {"plain": plain_loop(trainer), "trainer": trainer_step_fn(trainer)}
        device = trainer.device
        for run in loops.values():
            for _ in range(args.warmup):
                run()
        times: dict[str, list[float]] = {name: [] for name in loops}
        for r in range(args.rounds):
            order = list(loops) if r % 2 == 0 else list(reversed(loops))
            for name in order:
                times[name].append(timed(loops[name], args.steps, device))
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    ratio = ms["plain"] / ms["trainer"]
    round_ratios = [p / t for p, t in zip(times["plain"], times["trainer"], strict=True)]
    tokens = trainer.sampler.global_batch * trainer.sampler.block_size
    figures = {
        "device": str(device),
        "dtype": str(trainer.dtype).split(".")[-1],
        "threads": torch.get_num_threads(),
        "compile": cfg.train.compile,
        "optimizer": type(trainer.optimizer).__name__
        + ("(fused)" if trainer.optimizer.defaults.get("fused") else ""),
        "tokens_per_step": tokens,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "ms_per_step": ms,
        "tokens_per_sec": {name: tokens / (v / 1e3) for name, v in ms.items()},
        "ratio": ratio,
        "round_ratio_min": min(round_ratios),
        "round_ratio_max": max(round_ratios),
    }
    print(f"config overrides: {' '.join(expand(args.items)) or '(default)'}")
    print(
        f"device={device} dtype={figures['dtype']} threads={figures['threads']} "
        f"compile={cfg.train.compile} optimizer={figures['optimizer']}"
    )
    print(f"{args.rounds} rounds x {args.steps} steps per loop, alternating; median of rounds")
    for name, v in ms.items():
        print(f"  {name:8s} {v:8.1f} ms/step  {tokens / (v / 1e3):10,.0f} tokens/s")
    print(
        f"trainer speed-up over plain: {ratio:.3f}x "
        f"(rounds: {min(round_ratios):.3f}x-{max(round_ratios):.3f}x)"
    )
    if not args.no_save:
        append_result("loop_compare", {"overrides": expand(args.items), **figures})
    return figures


if __name__ == "__main__":
    main()
