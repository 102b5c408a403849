"""What the fine-tuning recipe (conf/experiment/finetune_gpt2.yaml) does to validation loss.

    python benchmarks/finetune_recipe.py --data '~/corpus/*.txt'            # from gpt2 (Hub)
    python benchmarks/finetune_recipe.py --stand-in --data '/usr/share/common-licenses/*' \\
        --steps 300 train.batch_size=8 train.grad_accum=1 --check-before    # offline, CPU

Three figures on the fine-tuning run's own validation batches (same tokenizer, split, block size,
batch size and eval_steps): BEFORE, the source model as it is (evaluated here the way
Trainer.evaluate does); AFTER, a ``train.py +experiment=finetune_gpt2`` run of --steps steps;
FROM SCRATCH, the same run started from minigpt's own random init of the same shape and
tokenizer (``GPT(config)`` after ``torch.manual_seed(train.seed)``, as train.py draws it, saved
as a model file and given as init_from), at --scratch-lr, since the recipe's lr is meant to adapt
trained weights, not to learn from nothing. Trailing arguments are Hydra overrides of both runs.

--stand-in is for machines without network: it first trains a small BPE model on the stdlib
corpus and exports it as a Hugging Face folder, which then stands in for GPT-2. Its figures say
what the recipe does to *that* model, not to GPT-2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, append_result, compose_config  # noqa: E402

from minigpt import pretrained, runtime, weights  # noqa: E402
from minigpt.batches import eval_batches  # noqa: E402
from minigpt.cli import quote_paths  # noqa: E402
from minigpt.data import prepare_corpus  # noqa: E402
from minigpt.model import GPT  # noqa: E402

RECIPE = "+experiment=finetune_gpt2"
STAND_IN = "stand-in"  # run folder of the stand-in's pretraining; its export is stand-in-hf/
HYDRA_DIR = "hydra.run.dir"
PATH_KEYS = (HYDRA_DIR, "data.cache_dir", "init_from")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Source, data, steps, the stand-in's size and free Hydra overrides."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra overrides of both runs (train.batch_size=2)")
    p.add_argument("--init-from", default="gpt2", help="Hub name, HF folder or minigpt checkpoint")
    p.add_argument(
        "--data", action="append", required=True, help="text files or a glob (repeatable)"
    )
    p.add_argument("--steps", type=int, default=500, help="train.max_steps of both runs")
    p.add_argument("--scratch-lr", type=float, help="default: conf/optimizer/adamw.yaml's lr")
    p.add_argument("--stand-in", action="store_true", help="pretrain a small stand-in (offline)")
    p.add_argument("--stand-in-steps", type=int, default=400)
    p.add_argument("--stand-in-model", default="mini", help="a conf/model preset")
    p.add_argument("--stand-in-vocab", type=int, default=4096, help="its BPE vocabulary")
    p.add_argument("--check-before", action="store_true", help="also measure BEFORE via train.py")
    p.add_argument(
        "--out",
        type=Path,
        help="run folders (default: a new temp folder); runs done there are read, not rerun",
    )
    p.add_argument("--no-save", action="store_true", help="do not append to results.jsonl")
    return p.parse_args(argv)


def with_override(overrides: list[str], key: str, value: Any) -> list[str]:
    """``overrides`` with ``key=value`` instead of any earlier value of ``key`` (one value per
    key: the printed command says what ran); a path is quoted as train.py quotes it."""
    kept = [o for o in overrides if o.partition("=")[0].lstrip("+~") != key]
    return [*kept, *quote_paths([f"{key}={value}"], PATH_KEYS)]


def run_train(name: str, out: Path, overrides: list[str]) -> dict[str, Any]:
    """``python train.py OVERRIDES`` into ``out/name``, as a user runs it; its results."""
    run_dir = out / name
    argv = [sys.executable, str(ROOT / "train.py"), *with_override(overrides, HYDRA_DIR, run_dir)]
    log = out / f"{name}.out"
    print(f"[{name}] {' '.join(argv[1:])}\n[{name}] console output: {log}", flush=True)
    start = time.perf_counter()
    with log.open("w", encoding="utf-8") as f:
        code = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, check=False).returncode
    seconds = time.perf_counter() - start
    if code != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
        sys.exit(f"[{name}] train.py exited with {code}:\n" + "\n".join(tail))
    return {**read_run(run_dir), "process_s": seconds}


def read_run(run_dir: Path) -> dict[str, Any]:
    """Final and best val loss from run.json, the val curve from metrics.jsonl."""
    info = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    curve = []
    with (run_dir / "metrics.jsonl").open(encoding="utf-8") as f:
        for line in f:
            event = json.loads(line)
            if "val/loss" in event:
                curve.append([event["step"], event["val/loss"]])
    return {
        "run_dir": str(run_dir),
        "final_val_loss": info["final_val_loss"],
        "best_val_loss": info["best_val_loss"],
        "steps": info["steps"],
        "params": info["params"],
        "wall_time_s": info["wall_time_s"],
        "val_curve": curve,
    }


def build_stand_in(out: Path, args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """Pretrain a small BPE model on the stdlib corpus and export it as a HF folder."""
    folder, run_dir = out / f"{STAND_IN}-hf", out / STAND_IN
    if folder.is_dir():
        print(f"[{STAND_IN}] reusing {folder}")
        return folder, read_run(run_dir)
    pretrain = [
        f"model={args.stand_in_model}",
        "data=stdlib",
        "data.tokenizer=bpe",
        f"data.vocab_size={args.stand_in_vocab}",
        f"train.max_steps={args.stand_in_steps}",
    ]
    pretrain += [o for o in args.overrides if o.startswith(("train.device=", "train.dtype="))]
    ran = run_train(STAND_IN, out, pretrain)
    export = [sys.executable, "-m", "minigpt.export", str(run_dir / "checkpoints" / "best.pt")]
    subprocess.run([*export, str(folder)], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    print(
        f"[{STAND_IN}] {ran['params'] / 1e6:.2f}M parameters, {ran['steps']} steps on the stdlib "
        f"corpus, val loss {ran['final_val_loss']:.4f} there, {ran['process_s']:.0f} s; "
        f"exported to {folder}"
    )
    return folder, ran


def source_loss(overrides: list[str]) -> float:
    """The source's val loss on the fine-tuning run's val batches, as Trainer.evaluate takes it:
    the same config, init_from reading, token cache, eval_batches, device and autocast dtype."""
    cfg = compose_config(overrides)
    init = pretrained.plan_init(cfg.init_from, cfg.model, cfg.data, overrides)
    data = replace(cfg.data, tokenizer=init.tokenizer.name)
    corpus = prepare_corpus(data, min_tokens=init.model.block_size + 1, tokenizer=init.tokenizer)
    gpt_cfg = init.model.gpt_config(corpus.tokenizer.vocab_size)
    model = GPT(gpt_cfg)
    model.load_state_dict(init.weights())
    device = torch.device(eval_device(cfg.train.device))
    dtype = runtime.resolve_dtype(cfg.train.dtype, device.type, gpt_cfg.d_model)
    batches = eval_batches(
        corpus.val, gpt_cfg.block_size, cfg.train.batch_size, cfg.train.eval_steps
    )
    return mean_loss(model.to(device).eval(), batches, device, dtype)


def eval_device(device: str) -> str:
    """train.device as one process resolves it (auto: the first GPU if any)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@torch.no_grad()
def mean_loss(model: GPT, batches: Any, device: torch.device, dtype: torch.dtype) -> float:
    """Trainer.evaluate on one rank: the mean of the per-batch mean losses."""
    total = 0.0
    for x, y in batches:
        with runtime.autocast(device.type, dtype):
            _, loss = model(x.to(device), y.to(device))
        total += float(loss.float())
    return total / len(batches)


def write_scratch_init(overrides: list[str], dst: Path) -> Path:
    """A model file of the run's shape and tokenizer holding minigpt's random init: the weights
    train.py draws for a run without init_from (``torch.manual_seed(train.seed)``, then GPT)."""
    cfg = compose_config(overrides)
    init = pretrained.plan_init(cfg.init_from, cfg.model, cfg.data, overrides)
    torch.manual_seed(cfg.train.seed)
    model = GPT(init.gpt_config())
    state = {
        "model": model.state_dict(),
        "model_config": asdict(model.config),
        "tokenizer": init.tokenizer.state(),
    }
    weights.write_safetensors(state, dst)
    return dst


def run_scratch(out: Path, overrides: list[str], lr: float) -> dict[str, Any]:
    """The fine-tuning run from random weights, at a from-scratch lr (min_lr = lr / 10)."""
    scratch_init = write_scratch_init(overrides, out / "scratch-init.safetensors")
    scratch = with_override(overrides, "init_from", scratch_init)
    scratch = with_override(scratch, "optimizer.lr", lr)
    scratch = with_override(scratch, "optimizer.min_lr", lr / 10)
    return run_train("scratch", out, scratch)


def check_before(out: Path, overrides: list[str]) -> float:
    """BEFORE through train.py: one step at lr 1e-30 (which leaves float32 weights as they are:
    optimizer.lr must be > 0), then the run's own evaluation."""
    tiny_lr = with_override(with_override(overrides, "optimizer.lr", 1e-30), "optimizer.min_lr", 0)
    return run_train("before-check", out, with_override(tiny_lr, "train.max_steps", 1))[
        "final_val_loss"
    ]


def ppl(loss: float) -> float:
    return math.exp(loss) if loss < 50 else math.inf


def print_table(source: str, steps: int, before: float, after: dict, scratch: dict) -> None:
    """Val loss and perplexity: before, after the recipe, from scratch (final and best)."""
    print(f"\nsource: {source}; {steps} steps; the fine-tuning run's validation batches")
    print(f"{'':<26} {'val loss':>9} {'ppl':>9} {'best loss':>10} {'best ppl':>9} {'wall s':>7}")
    print(f"{'before (source as is)':<26} {before:>9.4f} {ppl(before):>9.2f}")
    for name, ran in ((f"after {steps} steps (recipe)", after), ("from scratch", scratch)):
        final, best = ran["final_val_loss"], ran["best_val_loss"]
        print(
            f"{name:<26} {final:>9.4f} {ppl(final):>9.2f} {best:>10.4f} {ppl(best):>9.2f} "
            f"{ran['process_s']:>7.0f}"
        )
    for name, ran in (("after", after), ("scratch", scratch)):
        print(f"val loss by step, {name}: " + " ".join(f"{s}:{v:.3f}" for s, v in ran["val_curve"]))


def recipe_overrides(source: str, args: argparse.Namespace) -> list[str]:
    """The fine-tuning command's overrides: the recipe, the source, the data, the steps."""
    paths = [os.path.abspath(os.path.expanduser(p)) for p in args.data]
    overrides = with_override([RECIPE], "init_from", source)
    overrides = with_override(overrides, "data.paths", json.dumps(paths))
    overrides = with_override(overrides, "train.max_steps", args.steps)
    for override in args.overrides:
        key, _, value = override.partition("=")
        overrides = with_override(overrides, key.lstrip("+~"), value)
    return overrides


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Before, after and from scratch, printed as a table and appended to results.jsonl."""
    args = parse_args(argv)
    out = (args.out or Path(tempfile.mkdtemp(prefix="finetune_recipe-"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    source, stand_in = args.init_from, None
    if args.stand_in:
        folder, stand_in = build_stand_in(out, args)
        source = str(folder)
    overrides = recipe_overrides(source, args)
    before = source_loss(overrides)
    print(f"[before] val loss of the source as it is: {before:.4f}")
    checked = check_before(out, overrides) if args.check_before else None
    after = run_train("finetune", out, overrides)
    scratch_lr = args.scratch_lr or compose_config([]).optimizer.lr
    from_scratch = run_scratch(out, overrides, scratch_lr)
    label = f"STAND-IN, NOT GPT-2 ({source})" if args.stand_in else source
    print_table(label, args.steps, before, after, from_scratch)
    if checked is not None:
        print(f"before, via a 1-step train.py run at lr 1e-30: {checked:.6f} (here {before:.6f})")
    record = {
        "source": source,
        "stand_in": stand_in,
        "data": args.data,
        "steps": args.steps,
        "overrides": overrides,
        "scratch_lr": scratch_lr,
        "before_val_loss": before,
        "before_check_val_loss": checked,
        "after": after,
        "scratch": from_scratch,
        "total_s": time.perf_counter() - start,
    }
    (out / "result.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(f"total {record['total_s']:.0f} s; run folders and result.json in {out}")
    if not args.no_save:
        append_result("finetune_recipe", record)
    return record


if __name__ == "__main__":
    main()
