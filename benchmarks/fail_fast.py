"""How soon the offline refusals come back, and how cheap the lazy eval batches are.

    python benchmarks/fail_fast.py             # 3 repetitions of each, median printed
    python benchmarks/fail_fast.py --reps 5 --no-save

The tests check that each refusal happens (a ConfigError naming the key, a probe that stops
waiting); these are the seconds they take, which the tests no longer assert:

- the network probe against a request that stalls (as DNS does without network), timeout 0.2 s;
- ``data.tokenizer=gpt2`` with empty tiktoken and Hub caches (the real probe: on a machine with
  network this downloads the GPT-2 files instead, and the figure says so);
- ``data.source=hub`` for a dataset absent from an empty datasets cache, the probe answering no;
- ``eval_batches`` of a million batches built and the last one read (time and traced peak).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import append_result  # noqa: E402

from minigpt.config import ConfigError, DataConfig  # noqa: E402
from minigpt.tokenizer import build_tokenizer, can_reach  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Repetitions of each measurement."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--reps", type=int, default=3, help="repetitions of each measurement")
    p.add_argument("--no-save", action="store_true", help="do not append to results.jsonl")
    return p.parse_args(argv)


def seconds(action: Callable[[], Any]) -> tuple[float, Any]:
    """Wall seconds of ``action()`` and what it returned (or the ConfigError it raised)."""
    start = time.perf_counter()
    try:
        result = action()
    except ConfigError as err:
        result = err
    return time.perf_counter() - start, result


def stalled_probe_s() -> float:
    """can_reach(timeout=0.2) while the request hangs until we let it go."""
    release = threading.Event()
    real = urllib.request.urlopen
    urllib.request.urlopen = lambda *a, **k: release.wait(30)
    try:
        elapsed, reached = seconds(lambda: can_reach("https://example.invalid", timeout=0.2))
    finally:
        release.set()
        urllib.request.urlopen = real
    assert reached is False, "the stalled probe answered True"
    return elapsed


def gpt2_offline_s() -> tuple[float, str]:
    """build_tokenizer('gpt2') with empty caches: the refusal's seconds, or the download's."""
    keys = ("TIKTOKEN_CACHE_DIR", "HF_HUB_CACHE")
    saved = {key: os.environ.get(key) for key in keys}
    with tempfile.TemporaryDirectory(prefix="minigpt-fail-fast-") as tmp:
        os.environ["TIKTOKEN_CACHE_DIR"], os.environ["HF_HUB_CACHE"] = tmp, f"{tmp}/hub"
        try:
            elapsed, result = seconds(lambda: build_tokenizer("gpt2", None, 0))
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    return elapsed, "refused" if isinstance(result, ConfigError) else "downloaded"


def hub_offline_s() -> float:
    """prepare_corpus of an uncached hub dataset when the probe says there is no network."""
    import datasets

    from minigpt import data, documents

    real_cache, real_reach = datasets.config.HF_DATASETS_CACHE, documents.can_reach
    with tempfile.TemporaryDirectory(prefix="minigpt-fail-fast-") as tmp:
        datasets.config.HF_DATASETS_CACHE = f"{tmp}/hf"
        documents.can_reach = lambda url, timeout=3.0: False
        try:
            cfg = DataConfig(source="hub", name="roneneldan/TinyStories", cache_dir=tmp)
            elapsed, result = seconds(lambda: data.prepare_corpus(cfg))
        finally:
            datasets.config.HF_DATASETS_CACHE, documents.can_reach = real_cache, real_reach
    assert isinstance(result, ConfigError), f"expected a ConfigError, got {result!r}"
    return elapsed


def eval_batches_s() -> tuple[float, int]:
    """A million eval batches of 64 x 16 over a ramp: seconds and traced peak bytes."""
    import numpy as np

    from minigpt.batches import eval_batches

    tokens = np.arange(100_000, dtype=np.uint16)
    tracemalloc.start()
    elapsed, _ = seconds(lambda: eval_batches(tokens, 16, batch_size=64, n_batches=10**6)[-1])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return elapsed, peak


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Print the median seconds of each refusal and of the lazy eval batches."""
    args = parse_args(argv)
    probe = statistics.median(stalled_probe_s() for _ in range(args.reps))
    gpt2 = [gpt2_offline_s() for _ in range(args.reps)]
    hub = statistics.median(hub_offline_s() for _ in range(args.reps))
    batches = [eval_batches_s() for _ in range(args.reps)]
    figures = {
        "reps": args.reps,
        "stalled_probe_s": probe,
        "gpt2_offline_s": statistics.median(s for s, _ in gpt2),
        "gpt2_outcome": gpt2[-1][1],
        "hub_offline_s": hub,
        "eval_batches_1e6_s": statistics.median(s for s, _ in batches),
        "eval_batches_1e6_peak_bytes": max(p for _, p in batches),
    }
    print(f"network probe, stalled request, timeout 0.2 s: {probe:.3f} s")
    print(f"data.tokenizer=gpt2, empty caches ({gpt2[-1][1]}): {figures['gpt2_offline_s']:.2f} s")
    print(f"data.source=hub, uncached, no network: {hub:.3f} s")
    print(
        f"eval_batches(10**6) + last batch: {figures['eval_batches_1e6_s'] * 1e3:.2f} ms, "
        f"peak {figures['eval_batches_1e6_peak_bytes'] / 1e3:.0f} kB traced"
    )
    if not args.no_save:
        append_result("fail_fast", figures)
    return figures


if __name__ == "__main__":
    main()
