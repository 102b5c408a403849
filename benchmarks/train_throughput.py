"""Training throughput and MFU of the real Trainer step, for a config given as Hydra overrides.

    python benchmarks/train_throughput.py a                 # standard config (a)
    python benchmarks/train_throughput.py b --steps 20
    python benchmarks/train_throughput.py default --steps 10
    python benchmarks/train_throughput.py model=small train.batch_size=8   # any overrides
    python benchmarks/train_throughput.py b --loop plain    # nanoGPT-style loop, same model

MFU is against the sustained matmul FLOP/s measured in the same run (fp32 on CPU, the run's dtype
on CUDA, where the datasheet peak is printed too). One JSON line per run goes to results.jsonl.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import PRESETS, append_result, compose_config  # noqa: E402

from minigpt import distributed, peak  # noqa: E402
from minigpt.trainer import Trainer  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Preset names and Hydra overrides, in any order."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("items", nargs="*", help=f"presets ({', '.join(PRESETS)}) or key=value")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--loop", choices=["trainer", "plain"], default="trainer")
    p.add_argument("--peak-seconds", type=float, default=1.0, help="matmul timing length")
    p.add_argument("--no-save", action="store_true", help="do not append to results.jsonl")
    return p.parse_args(argv)


def expand(items: list[str]) -> list[str]:
    """Presets become their overrides; anything else is passed on as an override."""
    out: list[str] = []
    for item in items:
        if item in PRESETS:
            out += PRESETS[item]
        elif "=" in item:
            out.append(item)
        else:
            raise SystemExit(f"unknown preset {item!r}; use one of {', '.join(PRESETS)}")
    return out


def measured_peak(device: torch.device, dtype: torch.dtype, seconds: float) -> dict[str, Any]:
    """Sustained matmul FLOP/s in the MFU dtype (fp32 on CPU), plus the datasheet on CUDA."""
    if device.type == "cuda":
        mm_dtype = torch.bfloat16 if dtype == torch.float32 else dtype
        n = 8192
    else:
        mm_dtype, n = torch.float32, 1024
    flops = peak.measure_matmul_flops(device, mm_dtype, n=n, seconds=seconds)
    out: dict[str, Any] = {"peak_measured": flops, "peak_dtype": str(mm_dtype).split(".")[-1]}
    if device.type == "cuda":
        out["peak_datasheet"], out["peak_datasheet_source"] = peak.peak_flops(device, mm_dtype)
    return out


def plain_step_fn(trainer: Trainer) -> Any:
    """A nanoGPT-style step on the trainer's model and batches: default AdamW, no autocast."""
    model, cfg = trainer.model, trainer.cfg
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optimizer.lr, betas=(0.9, 0.95))
    step = [0]

    def run() -> None:
        x, y = trainer.sampler.batch(step[0], 0, 1, 0, 1)
        x, y = x.to(trainer.device), y.to(trainer.device)
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step[0] += 1

    return run


def trainer_step_fn(trainer: Trainer) -> Any:
    """The real Trainer._train_step, advancing the step counter as the loop does."""

    def run() -> None:
        trainer._train_step()
        trainer.state.step += 1

    return run


def peak_memory_gb(device: torch.device) -> float:
    """RSS high-water mark on CPU (Linux reports KiB), PyTorch's peak allocation on CUDA."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Build the Trainer, time its steps, print and record the figures."""
    args = parse_args(argv)
    overrides = expand(args.items) + ["logger=none", "resume=never"]
    cfg = compose_config(overrides)
    dist = distributed.setup(cfg.train.device, cfg.cluster.backend, cfg.cluster.init_timeout_s)
    with tempfile.TemporaryDirectory(prefix="minigpt-bench-") as run_dir:
        trainer = Trainer(cfg, Path(run_dir), dist, overrides)
        device = trainer.device
        run = trainer_step_fn(trainer) if args.loop == "trainer" else plain_step_fn(trainer)
        tokens_per_step = trainer.sampler.global_batch * trainer.sampler.block_size
        for _ in range(args.warmup):
            run()
        peak.sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            run()
        peak.sync(device)
        seconds = (time.perf_counter() - start) / args.steps
        memory = peak_memory_gb(device)
        peak_figures = measured_peak(device, trainer.dtype, args.peak_seconds)
    tokens_per_sec = tokens_per_step / seconds
    achieved = trainer.flops_per_token * tokens_per_sec
    figures = {
        "loop": args.loop,
        "device": str(device),
        "dtype": str(trainer.dtype).split(".")[-1],
        "threads": torch.get_num_threads(),
        "params": trainer.model.num_params(),
        "tokens_per_step": tokens_per_step,
        "warmup": args.warmup,
        "steps": args.steps,
        "tokens_per_sec": tokens_per_sec,
        "ms_per_step": seconds * 1e3,
        "flops_per_token": trainer.flops_per_token,
        "achieved_flops": achieved,
        **peak_figures,
        "mfu": achieved / peak_figures["peak_measured"],
        "peak_memory_gb": memory,
    }
    if "peak_datasheet" in peak_figures:
        figures["mfu_datasheet"] = achieved / peak_figures["peak_datasheet"]
    print(f"config overrides: {' '.join(expand(args.items)) or '(default)'}")
    print(f"loop={args.loop} device={device} dtype={figures['dtype']} threads={figures['threads']}")
    print(f"params: {figures['params'] / 1e6:.2f}M  tokens/step: {tokens_per_step}")
    print(f"tokens/s: {tokens_per_sec:,.0f}  ms/step: {seconds * 1e3:.1f}")
    fpt = trainer.flops_per_token
    print(f"FLOPs/token: {fpt / 1e6:.2f}M  achieved: {achieved / 1e9:.1f} GFLOP/s")
    measured = peak_figures["peak_measured"] / 1e9
    print(f"measured {peak_figures['peak_dtype']} matmul peak: {measured:.1f} GFLOP/s")
    if "peak_datasheet" in peak_figures:
        print(f"datasheet peak: {peak_figures['peak_datasheet'] / 1e12:.0f} TFLOP/s")
        print(f"MFU vs datasheet: {figures['mfu_datasheet']:.3f}")
    print(f"MFU vs measured peak: {figures['mfu']:.3f}")
    print(f"peak memory: {memory:.2f} GiB ({'RSS' if device.type == 'cpu' else 'allocated'})")
    if not args.no_save:
        append_result("train_throughput", {"overrides": expand(args.items), **figures})
    return figures


if __name__ == "__main__":
    main()
