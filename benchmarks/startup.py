"""Start-up: seconds from launching ``python train.py`` to its first training step.

    python benchmarks/startup.py                        # default run, 5 timed launches
    python benchmarks/startup.py --runs 9 model=small   # any overrides
    python benchmarks/startup.py --repo /tmp/before --repo .   # two checkouts, alternating

Each launch is a real one-step ``train.py`` run in its own folder; the figure is the run's own
``startup_s`` (run.json: the process's age, read from /proc, when the first step starts, so the
interpreter and every import count). One untimed launch first fills the token cache and the
peak-FLOP/s cache, as a second run of a project has them. With several ``--repo`` the launches
alternate between them, so a noisy machine weighs on each alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, append_result  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Overrides for train.py, the launches, and the checkouts to compare."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("overrides", nargs="*", help="train.py overrides (key=value)")
    p.add_argument("--runs", type=int, default=5, help="timed launches per checkout")
    p.add_argument("--repo", action="append", type=Path, help="checkout (default: this one)")
    p.add_argument("--no-save", action="store_true", help="do not append to results.jsonl")
    return p.parse_args(argv)


def launch(repo: Path, run_dir: Path, overrides: list[str], cache: Path) -> float:
    """One one-step run of ``repo``'s train.py; its startup_s."""
    cmd = [
        sys.executable,
        "train.py",
        "train.max_steps=1",
        "train.eval_every=0",
        "train.eval_steps=1",
        "train.progress=off",
        "logger=none",
        f"data.cache_dir={cache}",
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(repo)}
    subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True, text=True)
    return float(json.loads((run_dir / "run.json").read_text())["startup_s"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Launch, collect startup_s per checkout, print median and range."""
    args = parse_args(argv)
    repos = [r.resolve() for r in (args.repo or [ROOT])]
    seconds: dict[str, list[float]] = {str(r): [] for r in repos}
    with tempfile.TemporaryDirectory(prefix="minigpt-startup-") as tmp:
        cache = Path(tmp) / "cache"
        for repo in repos:  # warm: token cache, peak cache, page cache
            launch(repo, Path(tmp) / f"warm-{len(seconds[str(repo)])}-{repo.name}", [], cache)
        for i in range(args.runs):
            for repo in repos if i % 2 == 0 else reversed(repos):
                seconds[str(repo)].append(
                    launch(repo, Path(tmp) / f"{repo.name}-{i}", args.overrides, cache)
                )
    figures = {
        repo: {"median_s": statistics.median(s), "min_s": min(s), "max_s": max(s), "runs": s}
        for repo, s in seconds.items()
    }
    for repo, f in figures.items():
        print(
            f"{repo}: start-up median {f['median_s']:.2f} s "
            f"(min {f['min_s']:.2f}, max {f['max_s']:.2f}, {len(f['runs'])} launches)"
        )
    if not args.no_save:
        append_result("startup", {"overrides": args.overrides, "figures": figures})
    return figures


if __name__ == "__main__":
    main()
