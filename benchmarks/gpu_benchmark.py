"""GPT-2 124M on one GPU in bf16: training tokens/s and MFU, eager and compiled, with the batch
that fits, then generation tokens/s with and without the KV cache.

    python benchmarks/gpu_benchmark.py                         # on a CUDA GPU
    python benchmarks/gpu_benchmark.py --cpu                   # CPU mode: a tiny model, < 1 min
    python benchmarks/gpu_benchmark.py --budget-s 120 --json out.json --no-save

Training is the real Trainer step on ``model=gpt2 model.block_size=1024 data.tokenizer=gpt2
train.dtype=bfloat16 model.dropout=0`` (extra ``key=value`` arguments are added). The batch is
the first of --batches whose first step runs without running out of memory; the compiled run
starts from the batch the eager one found. MFU is against the datasheet's dense bf16 peak
(H100/H200 SXM: 989 TFLOP/s) and against a bf16 matmul peak measured in the same run. Warm-up
steps are not timed; the first step of the compiled run (which compiles) is reported apart.

Phases: data, matmul peak, eager, generation, compiled (last: compiling is the longest and least
predictable part). Each takes a share of what is left of --budget-s when it starts and stops
timing once its share is spent (at least a few steps), so a slow phase cannot eat the next ones;
the JSON file is rewritten after every phase, so a run killed from outside keeps what it
measured. CPU mode (also
chosen when no GPU is visible) runs every path (batch search with a simulated out-of-memory,
eager, compiled, generation) on ``model=tiny`` in float32.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import sysconfig
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import append_result, compose_config  # noqa: E402
from generate_throughput import time_generation  # noqa: E402
from train_throughput import measured_peak, peak_memory_gb, trainer_step_fn  # noqa: E402

from minigpt import distributed, peak, runtime  # noqa: E402
from minigpt.data import prepare_corpus  # noqa: E402
from minigpt.model import GPT  # noqa: E402
from minigpt.trainer import Trainer  # noqa: E402

GPU_OVERRIDES = ["model=gpt2", "model.block_size=1024", "data.tokenizer=gpt2"]
GPU_OVERRIDES += ["train.dtype=bfloat16", "model.dropout=0", "train.device=cuda"]
CPU_OVERRIDES = ["model=tiny", "data.tokenizer=byte", "train.dtype=float32", "model.dropout=0"]
CPU_OVERRIDES += ["train.device=cpu"]
# Throughput does not depend on what the text says: the top level of the standard library
# (4.7 MB, 2.0M GPT-2 tokens for Python 3.11) tokenizes in a few seconds, the whole of it (the
# default corpus, 11 MB) took 9-18 s on 2 cores.
CORPUS = os.path.join(sysconfig.get_paths()["stdlib"], "*.py")
# No run folder, no evaluation batches to build beyond one, no logger.
QUIET = ["logger=none", "resume=never", "train.eval_steps=1"]
# Each phase's share of the budget left when it starts (compiling takes whatever remains).
SHARES = {"eager": 0.3, "generate": 0.25, "compiled": 1.0}
MIN_STEPS = 3  # timed steps, whatever the budget says
MIN_PHASE_S = 3.0  # less budget than this left: the phase is skipped
MFU_GOAL = 0.50  # issue 13: compiled, against the datasheet's dense bf16 peak


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Mode, budget, sizes; defaults depend on the mode (GPU or CPU)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides (key=value)")
    p.add_argument("--cpu", action="store_true", help="CPU mode (also without a visible GPU)")
    p.add_argument("--budget-s", type=float, help="whole run (default: GPU 150, CPU 60)")
    p.add_argument("--batches", type=int, nargs="+", help="batch sizes to try, largest first")
    p.add_argument("--warmup", type=int, help="untimed steps after the first (GPU 3, CPU 2)")
    p.add_argument("--steps", type=int, help="timed steps at most (GPU 20, CPU 5)")
    p.add_argument("--gen-tokens", type=int, help="new tokens per generation (GPU 500, CPU 48)")
    p.add_argument("--gen-batches", type=int, nargs="+", help="generation batches (1 8 / 1 4)")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled run")
    p.add_argument("--peak-seconds", type=float, help="matmul peak timing (GPU 1.0, CPU 0.3)")
    p.add_argument("--json", type=Path, help="write the figures here (after every phase)")
    p.add_argument("--no-save", action="store_true", help="do not append to results.jsonl")
    args = p.parse_args(argv)
    args.cpu = args.cpu or not torch.cuda.is_available()
    gpu = not args.cpu
    defaults = {
        "budget_s": 150.0 if gpu else 60.0,
        "batches": [64, 32, 16, 8] if gpu else [8, 4, 2],
        "warmup": 3 if gpu else 2,
        "steps": 20 if gpu else 5,
        "gen_tokens": 500 if gpu else 48,
        "gen_batches": [1, 8] if gpu else [1, 4],
        "peak_seconds": 1.0 if gpu else 0.3,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    # CPU memory never runs out at these sizes: pretend the larger batches do, so that the
    # search's recovery (free everything, try the next size) runs in CPU mode too.
    args.simulate_oom_above = None if gpu else args.batches[len(args.batches) // 2]
    return args


class Budget:
    """Seconds left of the run's budget; a phase gets a share of what is left when it starts."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.perf_counter()

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def deadline(self, share: float) -> float:
        return time.perf_counter() + max(0.0, self.left()) * share


def base_overrides(args: argparse.Namespace) -> list[str]:
    """The model, tokenizer and precision of the mode, on the small corpus."""
    mode = CPU_OVERRIDES if args.cpu else GPU_OVERRIDES
    return [*mode, "data=text", f'data.paths=["{CORPUS}"]', *args.overrides]


def prepare_data(overrides: list[str]) -> dict[str, Any]:
    """Build (or find) the token cache once, timed: the Trainers then map it."""
    cfg = compose_config(overrides + QUIET)
    start = time.perf_counter()
    corpus = prepare_corpus(cfg.data, min_tokens=cfg.model.block_size + 1)
    return {
        "prep_s": time.perf_counter() - start,
        "source": cfg.data.source,
        "tokenizer": corpus.tokenizer.name,
        "backend": getattr(corpus.tokenizer, "backend", None),
        "vocab_size": corpus.tokenizer.vocab_size,
        "train_tokens": len(corpus.train),
        "cache": str(corpus.cache_path),
    }


def free_memory(device: torch.device) -> None:
    """Give back what a dropped Trainer held, before the next one is built."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def probe(
    overrides: list[str], batch: int, dist: Any, run_dir: Path, oom_above: int | None
) -> tuple[Trainer | None, dict[str, Any]]:
    """Build a Trainer at ``batch`` and run its first step; None when that runs out of memory."""
    trainer, start = None, time.perf_counter()
    cfg_overrides = overrides + QUIET + [f"train.batch_size={batch}"]
    try:
        trainer = Trainer(compose_config(cfg_overrides), run_dir, dist, cfg_overrides)
        built = time.perf_counter()
        if oom_above is not None and batch > oom_above:
            raise torch.OutOfMemoryError(f"simulated in CPU mode: batch {batch} > {oom_above}")
        trainer_step_fn(trainer)()
        peak.sync(trainer.device)
    except (RuntimeError, MemoryError) as err:  # torch.OutOfMemoryError is a RuntimeError
        if not runtime.is_out_of_memory(err):
            raise
        outcome = f"out of memory ({str(err).strip().splitlines()[0][:120]})"
    else:
        first_step_s = time.perf_counter() - built
        fits = {"batch": batch, "outcome": "fits", "build_s": built - start}
        return trainer, {**fits, "first_step_s": first_step_s}
    trainer = None
    free_memory(torch.device(dist.device))
    return None, {"batch": batch, "outcome": outcome}


def fit_batch(
    overrides: list[str], candidates: list[int], dist: Any, run_dir: Path, oom_above: int | None
) -> tuple[Trainer | None, list[dict[str, Any]]]:
    """The first candidate batch whose first step fits, as a Trainer that has taken that step."""
    tried = []
    for batch in candidates:
        trainer, outcome = probe(overrides, batch, dist, run_dir / f"b{batch}", oom_above)
        tried.append(outcome)
        print(f"  batch {batch}: {outcome['outcome']}", flush=True)
        if trainer is not None:
            return trainer, tried
    return None, tried


def time_steps(trainer: Trainer, deadline: float, warmup: int, steps: int) -> dict[str, Any]:
    """Warm-up steps, then timed ones until ``steps`` or the deadline (at least MIN_STEPS)."""
    run, device = trainer_step_fn(trainer), trainer.device
    done_warmup = 0
    while done_warmup < warmup and time.perf_counter() < deadline:
        run()
        done_warmup += 1
    peak.sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    n, start = 0, time.perf_counter()
    while n < steps and (n < MIN_STEPS or time.perf_counter() < deadline):
        run()
        n += 1
    peak.sync(device)
    seconds = (time.perf_counter() - start) / n
    tokens_per_step = trainer.sampler.global_batch * trainer.sampler.block_size
    return {
        "tokens_per_step": tokens_per_step,
        "warmup": done_warmup,
        "steps": n,
        "ms_per_step": seconds * 1e3,
        "tokens_per_sec": tokens_per_step / seconds,
        "peak_memory_gb": peak_memory_gb(device),
    }


def train_phase(
    args: argparse.Namespace,
    overrides: list[str],
    candidates: list[int],
    deadline: float,
    peaks: dict[str, Any],
    run_dir: Path,
) -> dict[str, Any]:
    """Find the batch, time the steps, work out MFU against both peaks."""
    dist = distributed.setup("cpu" if args.cpu else "cuda")
    trainer, tried = fit_batch(overrides, candidates, dist, run_dir, args.simulate_oom_above)
    if trainer is None:
        raise RuntimeError(f"no batch of {candidates} fits: {tried}")
    out: dict[str, Any] = {"batch": trainer.cfg.train.batch_size, "tried": tried}
    out["build_s"], out["first_step_s"] = tried[-1]["build_s"], tried[-1]["first_step_s"]
    out |= time_steps(trainer, deadline, args.warmup, args.steps)
    if trainer.cfg.train.compile:  # the first step compiled the model, then ran like the others
        out["compile_s"] = out["first_step_s"] - out["ms_per_step"] / 1e3
    out["flops_per_token"] = trainer.flops_per_token
    out["params"] = trainer.model.num_params()
    out["dtype"] = str(trainer.dtype).removeprefix("torch.")
    out["achieved_flops"] = trainer.flops_per_token * out["tokens_per_sec"]
    out["mfu_measured"] = out["achieved_flops"] / peaks["peak_measured"]
    if "peak_datasheet" in peaks:
        out["mfu_datasheet"] = out["achieved_flops"] / peaks["peak_datasheet"]
    device = trainer.device
    del trainer
    free_memory(device)
    return out


def generate_phase(
    args: argparse.Namespace, overrides: list[str], vocab_size: int, deadline: float
) -> dict[str, Any]:
    """Greedy generation from a random GPT of the benchmark's shape, in the training dtype
    (weights cast, so the KV cache is in it too), with and without the KV cache."""
    cfg = compose_config(overrides + QUIET)
    device = torch.device("cpu" if args.cpu else "cuda")
    dtype = runtime.DTYPES[cfg.train.dtype]
    torch.manual_seed(0)
    with device:
        model = GPT(cfg.model.gpt_config(vocab_size)).to(dtype)
    time_generation(model, 1, 8, True, device)  # warm-up: kernels, allocator, cuBLAS handles
    time_generation(model, 1, 8, False, device)
    rows = []
    for batch in args.gen_batches:
        if time.perf_counter() > deadline:
            rows.append({"batch": batch, "skipped": "budget spent"})
            continue
        cached = time_generation(model, batch, args.gen_tokens, True, device)
        uncached = time_generation(model, batch, args.gen_tokens, False, device)
        tokens = batch * args.gen_tokens
        rows.append({"batch": batch, "new_tokens": args.gen_tokens, "speedup": uncached / cached})
        rows[-1] |= {"cached_tokens_per_sec": tokens / cached}
        rows[-1] |= {"uncached_tokens_per_sec": tokens / uncached}
        print(
            f"  batch {batch}: cached {tokens / cached:,.0f} tok/s, uncached "
            f"{tokens / uncached:,.0f} tok/s ({uncached / cached:.2f}x)",
            flush=True,
        )
    return {"dtype": str(dtype).removeprefix("torch."), "prompt_tokens": 16, "rows": rows}


def run_phase(name: str, record: dict[str, Any], budget: Budget, fn: Any, *fn_args: Any) -> Any:
    """Run one phase: skipped when the budget is spent, its error recorded (not raised)."""
    if budget.left() < MIN_PHASE_S:
        record["phases"][name] = {"status": "skipped", "reason": "budget spent"}
        print(f"[{name}] skipped: budget spent", flush=True)
        return None
    print(f"[{name}] start ({budget.left():.0f} s of the budget left)", flush=True)
    start = time.perf_counter()
    try:
        result = fn(*fn_args)
        status = {"status": "ok"}
    except Exception as err:  # one phase failing must not cost the others' figures
        traceback.print_exc()
        result, status = None, {"status": "failed", "error": f"{type(err).__name__}: {err}"[:500]}
    status["seconds"] = round(time.perf_counter() - start, 2)
    record["phases"][name] = status
    print(f"[{name}] {status['status']} in {status['seconds']:.1f} s", flush=True)
    return result


def device_facts(cpu: bool) -> dict[str, Any]:
    """The device's name and memory, and the versions that decide whether runs compare."""
    facts: dict[str, Any] = {"mode": "cpu" if cpu else "cuda", "versions": runtime.versions()}
    if cpu:
        facts["device_name"] = peak.cpu_model()
        facts["threads"] = torch.get_num_threads()
    else:
        props = torch.cuda.get_device_properties(0)
        facts["device_name"] = props.name
        facts["memory_gb"] = props.total_memory / 2**30
        facts["capability"] = f"{props.major}.{props.minor}"
    return facts


def write_json(record: dict[str, Any], path: Path | None) -> None:
    """Rewrite the figures so far (atomically): a run killed later keeps them."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)


def tflops(flops: float) -> str:
    """FLOP/s in the unit that suits them: TFLOP/s for a GPU, GFLOP/s for a CPU."""
    return f"{flops / 1e12:.1f} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:.1f} GFLOP/s"


def print_table(record: dict[str, Any]) -> None:
    """Training and generation figures as two small tables."""
    peaks = record.get("peak") or {}
    if peaks:
        line = f"measured {peaks['peak_dtype']} matmul peak: {tflops(peaks['peak_measured'])}"
        if "peak_datasheet" in peaks:
            line += f"; datasheet ({peaks['peak_datasheet_source']}) "
            line += tflops(peaks["peak_datasheet"])
        print(line)
    head = ("run", "batch", "tokens/s", "ms/step", "MFU sheet", "MFU meas", "mem GiB", "1st step s")
    print("{:<9} {:>5} {:>11} {:>8} {:>9} {:>8} {:>7} {:>10}".format(*head))
    for name in ("eager", "compiled"):
        r = record.get(name) or {}
        if "tokens_per_sec" not in r:
            print(f"{name:<9} {record['phases'].get(name, {}).get('status', 'not run')}")
            continue
        sheet = f"{r['mfu_datasheet']:.3f}" if "mfu_datasheet" in r else "-"
        figures = (r["batch"], f"{r['tokens_per_sec']:,.0f}", f"{r['ms_per_step']:.1f}", sheet)
        figures += (f"{r['mfu_measured']:.3f}", f"{r['peak_memory_gb']:.1f}")
        figures += (f"{r['first_step_s']:.1f}",)
        print("{:<9} {:>5} {:>11} {:>8} {:>9} {:>8} {:>7} {:>10}".format(name, *figures))
    compiled = record.get("compiled") or {}
    if "mfu_datasheet" in compiled:
        met = "met" if compiled["mfu_datasheet"] >= MFU_GOAL else "not met"
        print(
            f"goal: compiled MFU vs datasheet {compiled['mfu_datasheet']:.3f} >= {MFU_GOAL}: {met}"
        )
    gen = record.get("generate") or {}
    for row in gen.get("rows", []):
        if "speedup" in row:
            print(
                f"generate batch {row['batch']}, {row['new_tokens']} tokens ({gen['dtype']}): "
                f"KV cache {row['cached_tokens_per_sec']:,.0f} tok/s, without "
                f"{row['uncached_tokens_per_sec']:,.0f} tok/s: {row['speedup']:.2f}x"
            )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Data, matmul peak, eager, generation, compiled: each phase in its share of the budget."""
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    overrides = base_overrides(args)
    device = torch.device("cpu" if args.cpu else "cuda")
    record: dict[str, Any] = {"benchmark": "gpu_benchmark", **device_facts(args.cpu)}
    record |= {"overrides": overrides, "budget_s": args.budget_s, "phases": {}}
    print(f"{record['mode']} mode on {record['device_name']}: {' '.join(overrides)}", flush=True)
    record["data"] = run_phase("data", record, budget, prepare_data, overrides)
    write_json(record, args.json)
    dtype = torch.bfloat16 if not args.cpu else torch.float32
    record["peak"] = run_phase(
        "peak", record, budget, measured_peak, device, dtype, args.peak_seconds
    )
    write_json(record, args.json)
    peaks = record["peak"] or {"peak_measured": float("nan")}
    with tempfile.TemporaryDirectory(prefix="minigpt-gpu-bench-") as tmp:
        deadline = budget.deadline(SHARES["eager"])
        eager = (args, overrides, args.batches, deadline, peaks, Path(tmp, "eager"))
        record["eager"] = run_phase("eager", record, budget, train_phase, *eager)
        write_json(record, args.json)
        # Generation before compiling: it is short and sure, compilation long and less so.
        vocab = (record["data"] or {}).get("vocab_size") or 50257
        generate = (args, overrides, vocab, budget.deadline(SHARES["generate"]))
        record["generate"] = run_phase("generate", record, budget, generate_phase, *generate)
        write_json(record, args.json)
        found = (record["eager"] or {}).get("batch")
        smaller = [b for b in args.batches if found is None or b <= found]
        if not args.no_compile:
            deadline = budget.deadline(SHARES["compiled"])
            compiled = (args, overrides + ["train.compile=true"], smaller, deadline, peaks)
            compiled += (Path(tmp, "compiled"),)
            record["compiled"] = run_phase("compiled", record, budget, train_phase, *compiled)
    record["total_s"] = round(budget.seconds - budget.left(), 2)
    write_json(record, args.json)
    print_table(record)
    if not args.no_save:
        append_result("gpu_benchmark", record)
    return record


if __name__ == "__main__":
    main()
