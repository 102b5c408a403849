"""Generation speed of minigpt.sample.generate, with and without the KV cache.

    python benchmarks/generate_throughput.py           # 500 and 200 tokens, batch 1 and 8
    python benchmarks/generate_throughput.py --tokens 1000 --batch 1 --model mini

A randomly initialised model (``model=small`` by default: block 256, byte vocabulary), greedy
decoding from a 16-token prompt. Past block_size the window keeps its newest half, with or
without the cache (so both give the same tokens): the cache re-fills once per half window.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import append_result, compose_config  # noqa: E402

from minigpt.model import GPT  # noqa: E402
from minigpt.sample import generate  # noqa: E402

PROMPT_TOKENS = 16


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Token counts, batch sizes and the model preset."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[500, 200])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--model", default="small", help="a conf/model preset")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-save", action="store_true", help="do not append to results.jsonl")
    return p.parse_args(argv)


def time_generation(
    model: GPT, batch: int, new_tokens: int, use_cache: bool, device: torch.device
) -> float:
    """Seconds to greedily generate ``new_tokens`` for ``batch`` sequences."""
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (batch, PROMPT_TOKENS), generator=gen)
    prompt = prompt.to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in generate(model, prompt, new_tokens, greedy=True, use_cache=use_cache):
        pass
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Time each (tokens, batch) with and without the cache; print tokens/s and the ratio."""
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = GPT(compose_config([f"model={args.model}"]).model.gpt_config(256)).to(device)
    time_generation(model, 1, 8, True, device)  # warm-up
    time_generation(model, 1, 8, False, device)
    rows = []
    print(f"model={args.model} block={model.config.block_size} device={device} greedy")
    print(f"{'tokens':>6} {'batch':>5} {'cached tok/s':>13} {'uncached tok/s':>15} {'ratio':>6}")
    for new_tokens in args.tokens:
        for batch in args.batch:
            cached = time_generation(model, batch, new_tokens, True, device)
            uncached = time_generation(model, batch, new_tokens, False, device)
            row = {
                "model": args.model,
                "device": str(device),
                "new_tokens": new_tokens,
                "batch": batch,
                "cached_tokens_per_sec": batch * new_tokens / cached,
                "uncached_tokens_per_sec": batch * new_tokens / uncached,
                "speedup": uncached / cached,
            }
            rows.append(row)
            print(
                f"{new_tokens:>6} {batch:>5} {row['cached_tokens_per_sec']:>13,.0f} "
                f"{row['uncached_tokens_per_sec']:>15,.0f} {row['speedup']:>5.2f}x"
            )
            if not args.no_save:
                append_result("generate_throughput", row)
    return rows


if __name__ == "__main__":
    main()
