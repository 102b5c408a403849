"""Plant each fault of issue 16 in a copy of the project and run the test named to catch it.

A fault is one textual change to one file; it is *caught* when the named tests fail on the copy
(and pass on the unchanged copy, checked first). mutmut (``make mutation``) plants thousands of
small faults at random; these are the ones a person found surviving, each with the test that
now names the behaviour. Writes benchmarks/mutation/PLANTED.md:

    python scripts/plant_faults.py [--only NAME ...] [--out benchmarks/mutation/PLANTED.md]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("minigpt", "tests", "conf", "sweeps", "hydra_plugins", "train.py", "generate.py")
COPIED += ("pyproject.toml",)


@dataclass(frozen=True)
class Fault:
    """``old`` (found exactly once in ``path``) becomes ``new``; ``tests`` must then fail."""

    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


TRAINER = "tests/unit/test_trainer.py"
FAULTS = (
    Fault(
        "gradient clipping ignored",
        "minigpt/trainer.py",
        "max_norm = self.cfg.optimizer.grad_clip or math.inf",
        "max_norm = math.inf",
        (f"{TRAINER}::test_grad_clip_bounds_the_update",),
    ),
    Fault(
        "the lr set on the first parameter group only",
        "minigpt/optim.py",
        '    for group in optimizer.param_groups:\n        group["lr"] = lr',
        '    optimizer.param_groups[0]["lr"] = lr',
        (f"{TRAINER}::test_every_param_group_gets_the_scheduled_lr",),
    ),
    Fault(
        "dropout seed ignores the step (the same masks every step)",
        "minigpt/trainer.py",
        "np.random.SeedSequence([seed, step, part])",
        "np.random.SeedSequence([seed, 0, part])",
        (f"{TRAINER}::test_dropout_masks_differ_between_steps",),
    ),
    Fault(
        "dropout not reseeded per micro-step (masks from the global generator)",
        "minigpt/trainer.py",
        "torch.manual_seed(_dropout_seed(cfg.seed, self.state.step, part))",
        "pass",
        (f"{TRAINER}::test_resume_needs_no_global_rng_state",),
    ),
    Fault(
        "evaluation's all-reduce skipped (each rank reports its own shard)",
        "minigpt/trainer.py",
        "distributed.all_reduce_sum(sums, self.dist)",
        "pass",
        (
            f"{TRAINER}::test_evaluate_averages_over_all_ranks",
            f"{TRAINER}::test_best_checkpoint_is_the_lowest_val_loss_agreed_by_all_ranks",
        ),
    ),
    Fault(
        "best.pt written at every evaluation",
        "minigpt/trainer.py",
        "is_best = val_loss is not None and val_loss < self.state.best_val_loss",
        "is_best = val_loss is not None",
        (f"{TRAINER}::test_best_checkpoint_keeps_the_lowest_val_loss",),
    ),
    Fault(
        "a non-finite step applied instead of skipped",
        "minigpt/trainer.py",
        "if finite or self.scaler.is_enabled():",
        "if True:",
        (f"{TRAINER}::test_non_finite_step_is_skipped",),
    ),
    Fault(
        "the micro-step loss not divided by train.grad_accum",
        "minigpt/trainer.py",
        "loss = loss / cfg.grad_accum",
        "loss = loss",
        (f"{TRAINER}::test_grad_accum_matches_one_big_batch",),
    ),
    Fault(
        "dropout masks drawn per micro-step index, not per slice of the global batch",
        "minigpt/trainer.py",
        "part = dist.rank * cfg.grad_accum + micro",
        "part = micro",
        (f"{TRAINER}::test_dropout_masks_match_across_world_sizes",),
    ),
    Fault(
        "the causal mask left out in training mode",
        "minigpt/model.py",
        "is_causal=mask is None and T > 1,",
        "is_causal=mask is None and T > 1 and not self.training,",
        ("tests/unit/test_model.py::test_causal_mask_hides_future_tokens",),
    ),
    Fault(
        "the global batch split micro-major instead of rank-major",
        "minigpt/batches.py",
        "start = (rank * grad_accum + micro) * size",
        "start = (micro * world_size + rank) * size",
        (
            f"{TRAINER}::test_global_batch_splits_rank_major",
            f"{TRAINER}::test_two_ranks_accumulating_match_one_rank_accumulating_more",
        ),
    ),
    Fault(
        "top-p applied before top-k",
        "minigpt/sample.py",
        "    if top_k is not None:\n        logits = _keep_top_k(logits, top_k)\n"
        "    if top_p is not None:\n        logits = _keep_top_p(logits, top_p)",
        "    if top_p is not None:\n        logits = _keep_top_p(logits, top_p)\n"
        "    if top_k is not None:\n        logits = _keep_top_k(logits, top_k)",
        ("tests/unit/test_nucleus.py::test_top_p_takes_its_share_of_what_top_k_left",),
    ),
    Fault(
        "the UTF-8 hold-back of streamed output removed",
        "minigpt/sample.py",
        'if text.endswith("\\ufffd") and len(held) < MAX_HELD_TOKENS:',
        "if False:",
        (
            "tests/unit/test_sample.py::"
            "test_streamed_text_is_whole_characters_and_equals_the_full_decode",
        ),
    ),
    *(
        Fault(
            f"train.{key} not validated",
            "minigpt/config.py",
            '("max_steps", "batch_size", "grad_accum", "eval_steps", "log_every")',
            str(
                tuple(
                    k
                    for k in ("max_steps", "batch_size", "grad_accum", "eval_steps", "log_every")
                    if k != key
                )
            ).replace("'", '"'),
            ("tests/unit/test_config.py::test_bad_value_raises_config_error_naming_the_key",),
        )
        for key in ("grad_accum", "eval_steps", "log_every")
    ),
    Fault(
        "train.keep_last not validated",
        "minigpt/config.py",
        '_require(self.keep_last >= 1, f"train.keep_last={self.keep_last} must be >= 1")',
        "pass",
        ("tests/unit/test_config.py::test_bad_value_raises_config_error_naming_the_key",),
    ),
    Fault(
        "a wrong type escapes as OmegaConf's error, not a ConfigError",
        "minigpt/config.py",
        "    except OmegaConfBaseException as err:\n        raise ConfigError(",
        "    except ZeroDivisionError as err:\n        raise ConfigError(",
        (
            "tests/unit/test_config.py::"
            "test_wrong_type_reaching_to_object_is_a_config_error_naming_the_key",
        ),
    ),
    Fault(
        "best.pt a copy, not the step file itself",
        "minigpt/checkpoint.py",
        "        link_or_copy(path, folder / BEST)",
        "        save(state, folder / BEST)",
        ("tests/unit/test_checkpoint.py::test_best_and_last_are_the_step_file_itself_not_copies",),
    ),
    Fault(
        "the lr not clamped to min_lr past max_steps",
        "minigpt/optim.py",
        "    if step >= max_steps:\n        return cfg.min_lr\n",
        "",
        ("tests/unit/test_optim.py::test_lr_stays_at_min_lr_past_max_steps",),
    ),
    Fault(
        "CPU flags read from the wrong field",
        "minigpt/runtime.py",
        'return set(line.split(":", 1)[1].split())',
        'return set(line.split(":", 1)[1].split()[1:])',
        ("tests/unit/test_runtime.py::test_cpu_flags_are_the_first_flags_line_of_proc_cpuinfo",),
    ),
    Fault(
        "GPT-2's vocabulary one short",
        "minigpt/tokenizer.py",
        "self.vocab_size, self.eot_id = self.encoding.n_vocab, self.encoding.eot_token",
        "self.vocab_size, self.eot_id = self.encoding.max_token_value, self.encoding.eot_token",
        (
            "tests/unit/test_tokenizer.py::test_gpt2_loads_tiktokens_cached_files_without_the_network",
        ),
    ),
)


def copy_project(dest: Path) -> None:
    """The parts of the project the tests read, without outputs, caches or venvs."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        else:
            shutil.copy2(src, dest / name)


def run_tests(copy: Path, tests: tuple[str, ...]) -> tuple[int, str]:
    """pytest on the copy, in one process; returns its exit code and last summary line."""
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-n0", "-p", "no:cacheprovider"]
    done = subprocess.run([*command, *tests], cwd=copy, capture_output=True, text=True, timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    return done.returncode, (failed[0] if failed else lines[-1] if lines else done.stderr[-300:])


def plant(copy: Path, fault: Fault) -> str:
    """Apply ``fault`` to the copy; returns the original text to put back."""
    target = copy / fault.path
    text = target.read_text(encoding="utf-8")
    count = text.count(fault.old)
    if count != 1:
        raise SystemExit(f"{fault.name}: the text to change occurs {count} times in {fault.path}")
    target.write_text(text.replace(fault.old, fault.new), encoding="utf-8")
    return text


def main(argv: list[str] | None = None) -> int:
    """Plant every fault (or those named), record caught or not, write the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="substrings of fault names to run")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/mutation/PLANTED.md")
    args = parser.parse_args(argv)
    faults = [f for f in FAULTS if not args.only or any(s in f.name for s in args.only)]
    rows, start = [], time.monotonic()
    with tempfile.TemporaryDirectory(prefix="minigpt-faults-") as tmp:
        copy = Path(tmp)
        copy_project(copy)
        for fault in faults:
            code, line = run_tests(copy, fault.tests)
            if code != 0:
                raise SystemExit(f"{fault.name}: the tests fail without the fault: {line}")
            original = plant(copy, fault)
            try:
                code, line = run_tests(copy, fault.tests)
            finally:
                (copy / fault.path).write_text(original, encoding="utf-8")
            caught = code == 1  # 1: tests failed; anything else is an error, not a catch
            rows.append((fault, caught, line))
            print(f"{'caught' if caught else 'MISSED'}: {fault.name}: {line}", flush=True)
    write_report(args.out, rows, time.monotonic() - start)
    missed = [f.name for f, caught, _ in rows if not caught]
    print(f"{len(rows) - len(missed)}/{len(rows)} caught; report: {args.out}")
    return 1 if missed else 0


def write_report(out: Path, rows: list[tuple[Fault, bool, str]], seconds: float) -> None:
    """A markdown table: fault, where it was planted, the test that caught it, what failed."""
    lines = [
        "# Planted faults (issue 16)",
        "",
        f"`python scripts/plant_faults.py`, {time.strftime('%Y-%m-%d')}: "
        f"{sum(c for _, c, _ in rows)}/{len(rows)} caught in {seconds:.0f} s. Each fault is "
        "planted in a copy of the project; the named tests pass without it and fail with it.",
        "",
        "| fault | planted in | caught by | result |",
        "| --- | --- | --- | --- |",
    ]
    for fault, caught, line in rows:
        tests = "<br>".join(f"`{t.split('::')[-1]}`" for t in fault.tests)
        shown = line.replace("|", "\\|")[:160]
        verdict = "caught" if caught else "**missed**"
        lines.append(f"| {fault.name} | `{fault.path}` | {tests} | {verdict}: {shown} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
