"""Corpus preparation speed and the batch sampler's share of a training step.

    python benchmarks/data_throughput.py                 # measures 3 steps of config (b) too
    python benchmarks/data_throughput.py --step-ms 850   # or give config (b)'s ms/step

Preparation tokenizes the stdlib corpus (byte tokenizer) into an empty temporary cache_dir, then
prepares it again from the cache. The sampler is timed at config (b)'s shapes (16 x 256).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_throughput  # noqa: E402
from _common import append_result  # noqa: E402

from minigpt.batches import BatchSampler  # noqa: E402
from minigpt.config import DataConfig  # noqa: E402
from minigpt.data import prepare_corpus  # noqa: E402
from minigpt.documents import stdlib_files  # noqa: E402

BLOCK_SIZE, BATCH_SIZE = 256, 16  # config (b)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Step time of config (b), sampler repetitions."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--step-ms", type=float, help="config (b) ms/step; measured when left out")
    p.add_argument("--batches", type=int, default=500, help="sampler calls to time")
    p.add_argument("--num-proc", type=int, default=2, help="data.num_proc")
    p.add_argument("--no-save", action="store_true", help="do not append to results.jsonl")
    return p.parse_args(argv)


def time_prepare(cfg: DataConfig) -> float:
    """Seconds for one prepare_corpus call."""
    start = time.perf_counter()
    prepare_corpus(cfg, min_tokens=BLOCK_SIZE + 1)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Print MB/s of both preparations and the sampler's cost per step."""
    args = parse_args(argv)
    mb = sum(f.stat().st_size for f in stdlib_files()) / 1e6
    with tempfile.TemporaryDirectory(prefix="minigpt-data-bench-") as cache_dir:
        cfg = DataConfig(source="stdlib", tokenizer="byte", cache_dir=cache_dir)
        cfg.num_proc = args.num_proc
        first = time_prepare(cfg)
        cached = time_prepare(cfg)
        corpus = prepare_corpus(cfg, min_tokens=BLOCK_SIZE + 1)
        sampler = BatchSampler(corpus.train, BLOCK_SIZE, BATCH_SIZE, seed=1337)
        sampler.batch(0, 0, 1, 0, 1)
        start = time.perf_counter()
        for step in range(args.batches):
            sampler.batch(step, 0, 1, 0, 1)
        batch_ms = (time.perf_counter() - start) / args.batches * 1e3
        train_tokens = len(corpus.train)
    step_ms = args.step_ms
    if step_ms is None:
        step_ms = train_throughput.main(["b", "--warmup", "2", "--steps", "3", "--no-save"])[
            "ms_per_step"
        ]
    figures = {
        "corpus_mb": mb,
        "train_tokens": train_tokens,
        "num_proc": args.num_proc,
        "prepare_first_s": first,
        "prepare_first_mb_per_s": mb / first,
        "prepare_cached_s": cached,
        "prepare_cached_mb_per_s": mb / cached,
        "batch_shape": [BATCH_SIZE, BLOCK_SIZE],
        "batch_ms": batch_ms,
        "step_ms": step_ms,
        "batch_fraction_of_step": batch_ms / step_ms,
    }
    print(f"stdlib corpus: {mb:.1f} MB, {train_tokens:,} train tokens, num_proc={args.num_proc}")
    print(f"prepare, empty cache: {first:.2f} s = {mb / first:.1f} MB/s")
    print(f"prepare, cached:      {cached:.3f} s = {mb / cached:,.0f} MB/s")
    print(f"sampler batch {BATCH_SIZE}x{BLOCK_SIZE}: {batch_ms:.3f} ms")
    print(f"config (b) step: {step_ms:.1f} ms -> sampler share {batch_ms / step_ms:.4%}")
    if not args.no_save:
        append_result("data_throughput", figures)
    return figures


if __name__ == "__main__":
    main()
