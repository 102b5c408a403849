#!/usr/bin/env python3
"""The Python half of scripts/gpu_check.sh: facts before, checks between, one summary after.

    python scripts/gpu_check.py facts FILE           the GPU (nvidia-smi), python, torch, CUDA
    python scripts/gpu_check.py make-env WHEELHOUSE VENV FILE   VENV layered on this python,
                                                     the wheelhouse's pins in it; verify-env
    python scripts/gpu_check.py verify-env FILE      minigpt imports; versions; GPT-2 tokenizer
    python scripts/gpu_check.py tests -- ARGS        pytest ARGS; SIGINT ends it with its report
    python scripts/gpu_check.py summary --work W --out O [--dry-run]

Standard library only, except what each step is there to look at (torch, minigpt, pytest), so
that the summary is written whatever failed before it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# What the benchmark is held to (issue 13): compiled MFU against the datasheet's dense peak.
MFU_GOAL = 0.50
NVIDIA_QUERY = "name,driver_version,memory.total,power.limit,clocks.max.sm,pstate"
# tests/gpu outcomes as pytest -v prints them, for when a killed run left no junit file.
VERBOSE_LINE = re.compile(
    r"(?P<id>tests/gpu/\S+::\S+)\s+(?P<outcome>PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)"
    r"|(?P<outcome2>PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\s+(?P<id2>tests/gpu/\S+::\S+)"
)
PARTS = ("facts", "environment", "tests", "benchmark")


# ---------------------------------------------------------------- facts, environment


def nvidia_smi() -> dict[str, Any]:
    """The GPU as the driver reports it, or why there is no answer."""
    if shutil.which("nvidia-smi") is None:
        return {"error": "nvidia-smi not found"}
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={NVIDIA_QUERY}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as err:
        return {"error": f"nvidia-smi failed: {err}"}
    keys = NVIDIA_QUERY.split(",")
    rows = [[v.strip() for v in line.split(",")] for line in out.strip().splitlines()]
    return {"gpus": [dict(zip(keys, row, strict=False)) for row in rows]}


def torch_facts() -> dict[str, Any]:
    """torch's version, its CUDA, and the device it sees."""
    try:
        import torch
    except ImportError as err:
        return {"error": f"torch does not import: {err}"}
    out: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda}
    out["cuda_available"] = torch.cuda.is_available()
    if out["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        out |= {"device_name": props.name, "memory_gb": round(props.total_memory / 2**30, 1)}
        out |= {"capability": f"{props.major}.{props.minor}", "devices": torch.cuda.device_count()}
        out["bf16"] = torch.cuda.is_bf16_supported()
        out["cudnn"] = torch.backends.cudnn.version()
    return out


def facts(path: Path) -> int:
    """Write the machine's facts; fail (1) only where a GPU run cannot go on: no CUDA device."""
    info = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "nvidia_smi": nvidia_smi(),
        **torch_facts(),
    }
    path.write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(info, indent=1))
    dry = os.environ.get("MINIGPT_GPU_DRY_RUN") == "1"
    return 0 if dry or info.get("cuda_available") else 1


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or "unknown"


def make_env(wheelhouse: Path, venv: Path, env_file: Path) -> int:
    """A venv that sees this interpreter's packages (torch) with the wheelhouse's pins installed
    in it, reused while requirements.txt and the interpreter are the same; then verify-env."""
    req = wheelhouse / "requirements.txt"
    if not req.is_file():
        print(
            f"error: no wheelhouse at {wheelhouse} (no requirements.txt); build one where pip "
            "reaches an index (python scripts/wheelhouse.py --out wheelhouse), pass --wheelhouse "
            "DIR, or --no-install with a PYTHON that has minigpt's requirements",
            file=sys.stderr,
        )
        return 1
    stamp = hashlib.sha256(req.read_bytes() + sys.executable.encode()).hexdigest()[:16]
    stamp_file, python = venv / ".gpu-check-stamp", venv / "bin" / "python"
    if python.exists() and stamp_file.exists() and stamp_file.read_text().strip() == stamp:
        print(f"reusing {venv} (same requirements.txt and interpreter)")
    else:
        shutil.rmtree(venv, ignore_errors=True)
        new_venv = [sys.executable, "-m", "venv", "--system-site-packages", str(venv)]
        # Without ensurepip (Debian's python3 without python3-venv): pip comes from the layer.
        if (
            subprocess.run(new_venv).returncode
            and subprocess.run([*new_venv, "--without-pip"]).returncode
        ):
            return 1
        if layer(venv):
            return 1
        pip = [str(python), "-m", "pip", "install", "--no-index", "--find-links", str(wheelhouse)]
        print(f"installing {req} into {venv}", flush=True)
        if subprocess.run([*pip, "--quiet", "-r", str(req)]).returncode:
            return 1
        stamp_file.write_text(stamp + "\n", encoding="utf-8")
    # The later parts run with this interpreter, even when the check below fails.
    (env_file.parent / "python").write_text(f"{python}\n", encoding="utf-8")
    return subprocess.run([str(python), __file__, "verify-env", str(env_file)]).returncode


def layer(venv: Path) -> int:
    """A .pth file in ``venv`` naming this interpreter's site-packages.

    ``python3 -m venv --system-site-packages`` shows the new venv the packages of the *base*
    interpreter; where python3 is itself a venv's (the GPU image's is /opt/torch/.venv), torch
    lives in that venv and would not be seen. The new venv's own packages still come first.
    """
    import site
    import sysconfig

    ask = "import sysconfig; print(sysconfig.get_path('purelib'))"
    run = subprocess.run([str(venv / "bin" / "python"), "-c", ask], capture_output=True, text=True)
    purelib = run.stdout.strip()
    if run.returncode or not purelib:
        print(f"{venv}/bin/python does not run: {run.stderr.strip()}", file=sys.stderr)
        return 1
    ours = [*site.getsitepackages(), sysconfig.get_path("purelib")]
    lines = list(dict.fromkeys(p for p in ours if os.path.isdir(p)))
    Path(purelib, "_gpu_check_base.pth").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{venv} also sees: {', '.join(lines)}")
    return 0


def verify_env(path: Path) -> int:
    """Import what the tests and the benchmark need, record versions, build GPT-2's tokenizer."""
    from importlib import metadata

    names = ("torch", "hydra-core", "omegaconf", "datasets", "tokenizers", "tiktoken", "numpy")
    names += ("pytest", "transformers", "huggingface-hub", "wandb", "submitit")
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    info: dict[str, Any] = {"python": sys.executable, "versions": versions}
    try:
        import minigpt.config  # noqa: F401  (hydra, omegaconf)
        import minigpt.trainer  # noqa: F401  (torch and the rest)
        from minigpt.tokenizer import GPT2Tokenizer
    except Exception as err:  # any failure here is the finding
        info["error"] = f"{type(err).__name__}: {err}"
    else:
        try:  # the GPU benchmark needs it; the dry run's CPU mode does not
            info["gpt2_tokenizer"] = GPT2Tokenizer().backend
        except Exception as err:
            info["gpt2_tokenizer"] = f"unavailable: {err}"
            if os.environ.get("MINIGPT_GPU_DRY_RUN") != "1":
                info["error"] = f"GPT-2's tokenizer: {err}"
    path.write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(info, indent=1))
    return 1 if "error" in info else 0


def tests(args: list[str]) -> int:
    """pytest, with SIGINT restored: a shell may start us with it ignored, and SIGINT is how the
    time limit asks pytest to stop and still write its junit report."""
    import pytest

    signal.signal(signal.SIGINT, signal.default_int_handler)
    return int(pytest.main(args))


# ---------------------------------------------------------------- summary


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file's object; None when missing or unreadable (a part died before writing it)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_parts(path: Path) -> list[dict[str, Any]]:
    """The shell's record of each part: name, budget, seconds, exit status, status, note."""
    parts = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return parts
    for line in lines:
        name, budget, seconds, rc, status, note = (line.split("\t") + [""] * 6)[:6]
        part = {"part": name, "budget_s": int(budget), "seconds": float(seconds), "rc": int(rc)}
        parts.append({**part, "status": status, "note": note})
    return parts


def junit_cases(path: Path) -> list[dict[str, Any]] | None:
    """One entry per test case of pytest's junit file; None when there is no usable file."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    cases = []
    for case in root.iter("testcase"):
        if not case.get("name"):  # the entry pytest writes for the test that SIGINT stopped
            continue
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (found.get("message") or found.text or "").strip().splitlines()
                message = message[0][:300] if message else ""
                break
        test_id = node_id(case.get("classname", ""), case.get("name", ""))
        cases.append({"test": test_id, "outcome": outcome, "seconds": float(case.get("time") or 0)})
        if message:
            cases[-1]["message"] = message
    return cases


def node_id(classname: str, name: str) -> str:
    """pytest's own id (tests/gpu/test_x.py::TestY::test_z) from junit's dotted classname."""
    parts = classname.split(".")
    for cut in range(len(parts), 0, -1):
        path = "/".join(parts[:cut]) + ".py"
        if (ROOT / path).is_file():
            return "::".join([path, *parts[cut:], name])
    return f"{classname}::{name}"


def log_cases(path: Path) -> list[dict[str, Any]]:
    """Outcomes read from pytest -v's lines: what a run killed before its report had done."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    cases = {}
    for m in VERBOSE_LINE.finditer(text):
        test_id, outcome = m["id"] or m["id2"], m["outcome"] or m["outcome2"]
        cases[test_id] = {"test": test_id, "outcome": outcome.lower()}
    return list(cases.values())


def unfinished(log: Path, cases: list[dict[str, Any]]) -> tuple[str | None, int | None]:
    """The test that was running when pytest was stopped (its -v line has no outcome yet), and
    how many collected tests have no outcome at all (None when the log does not say)."""
    try:
        text = log.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None, None
    started = re.findall(r"^(tests/gpu/\S+::\S+) *$", text, flags=re.M)
    collected = re.search(r"collected (\d+) items?", text)
    left = int(collected[1]) - len(cases) if collected else None
    return (started[-1] if started else None), left


def test_results(work: Path, out: Path) -> dict[str, Any]:
    """Cases and counts, from the junit file, else from the log; a test stopped by the time
    limit counts as interrupted, the tests after it as not run."""
    cases, source = junit_cases(out / "tests.xml"), "junit"
    if not cases:
        cases, source = log_cases(work / "tests.log"), "pytest -v lines of the log"
    running, left = unfinished(work / "tests.log", cases)
    if running and all(c["test"] != running for c in cases):
        cases.append({"test": running, "outcome": "interrupted"})
    counts: dict[str, int] = {}
    for case in cases:
        counts[case["outcome"]] = counts.get(case["outcome"], 0) + 1
    if left:
        counts["not run"] = left - (1 if running else 0)
    return {"source": source if cases else "none", "counts": counts, "cases": cases}


def verdict(
    parts: list[dict[str, Any]], results: dict[str, Any], bench: dict | None, dry_run: bool
) -> list[str]:
    """Why the check fails; empty when it passes. A GPU run must pass tests, not only skip
    them, and benchmark the GPU, not fall back to the CPU."""
    reasons = [
        f"{p['part']}: {p['status']}" + (f" ({p['note']})" if p["note"] else "")
        for p in parts
        if p["status"] not in ("ok", "skipped")
    ]
    counts = results["counts"]
    bad = sum(counts.get(k, 0) for k in ("failed", "error", "xpassed"))
    if bad:
        reasons.append(f"tests: {bad} failed")
    if counts.get("interrupted") or counts.get("not run"):
        reasons.append(f"tests: {counts.get('not run', 0) + counts.get('interrupted', 0)} not run")
    tests_ran = any(p["part"] == "tests" and p["status"] in ("ok", "failed") for p in parts)
    if tests_ran and not results["cases"]:
        reasons.append("tests: no test results")
    if not dry_run and results["cases"] and not results["counts"].get("passed"):
        reasons.append("tests: none passed")
    if not dry_run and bench and bench.get("mode") != "cuda":
        reasons.append(f"benchmark: ran in {bench.get('mode')} mode, not on a GPU")
    for phase, status in ((bench or {}).get("phases") or {}).items():
        why = status.get("error") or status.get("reason")
        if status.get("status") != "ok":
            reasons.append(
                f"benchmark {phase}: {status.get('status')}" + (f" ({why})" if why else "")
            )
    return reasons


def mfu_goal(bench: dict[str, Any] | None) -> dict[str, Any] | None:
    """Compiled MFU against the datasheet peak, and whether it reaches MFU_GOAL (GPU runs)."""
    compiled = (bench or {}).get("compiled") or {}
    if "mfu_datasheet" not in compiled:
        return None
    value = compiled["mfu_datasheet"]
    return {"mfu_datasheet_compiled": value, "goal": MFU_GOAL, "met": value >= MFU_GOAL}


def device_line(facts_: dict[str, Any] | None, dry_run: bool) -> str:
    """The GPU's name and memory with driver, torch and CUDA versions, in one line."""
    f = facts_ or {}
    gpus = (f.get("nvidia_smi") or {}).get("gpus") or []
    if f.get("device_name"):
        name = f"{f['device_name']} ({f.get('memory_gb')} GiB, sm {f.get('capability')})"
    elif dry_run:
        name = f"none: dry run on CPU ({f.get('cpu', 'unknown')}, {f.get('cores')} cores)"
    else:
        name = "no CUDA device seen"
    driver = f", driver {gpus[0].get('driver_version')}" if gpus else ""
    return f"{name}{driver}; python {f.get('python')}, torch {f.get('torch')}, CUDA {f.get('cuda')}"


def tflops(flops: float) -> str:
    """FLOP/s in the unit that suits them: TFLOP/s for a GPU, GFLOP/s for a CPU."""
    return f"{flops / 1e12:.1f} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:.1f} GFLOP/s"


def benchmark_lines(bench: dict[str, Any] | None) -> list[str]:
    """The benchmark's figures as markdown."""
    if not bench:
        return ["No benchmark figures (the benchmark wrote no JSON)."]
    peak = bench.get("peak") or {}
    lines = [f"{bench.get('mode')} mode, `{' '.join(bench.get('overrides', []))}`", ""]
    if peak:
        line = f"Matmul peak measured ({peak.get('peak_dtype')}): {tflops(peak['peak_measured'])}"
        if "peak_datasheet" in peak:
            line += f"; datasheet ({peak.get('peak_datasheet_source')}): "
            line += tflops(peak["peak_datasheet"])
        lines += [line, ""]
    lines += [
        "| run | batch | tokens/s | ms/step | MFU vs datasheet | MFU vs measured | peak mem GiB "
        "| first step s | timed steps |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ("eager", "compiled"):
        r = bench.get(name) or {}
        if "tokens_per_sec" not in r:
            status = (bench.get("phases") or {}).get(name, {})
            why = status.get("error", status.get("reason", ""))
            lines.append(f"| {name} | {status.get('status', 'not run')} {why} |||||||")
            continue
        sheet = f"{r['mfu_datasheet']:.3f}" if "mfu_datasheet" in r else "-"
        lines.append(
            f"| {name} | {r['batch']} | {r['tokens_per_sec']:,.0f} | {r['ms_per_step']:.1f} | "
            f"{sheet} | {r['mfu_measured']:.3f} | {r['peak_memory_gb']:.1f} | "
            f"{r['first_step_s']:.1f} | {r['steps']} |"
        )
    compile_s = (bench.get("compiled") or {}).get("compile_s")
    if compile_s is not None:
        lines += [
            "",
            f"Compilation: {compile_s:.1f} s (the compiled run's first step, less a step)",
        ]
    gen = bench.get("generate") or {}
    if gen.get("rows"):
        what = f"{gen.get('dtype')}, greedy, {gen.get('prompt_tokens')}-token prompt"
        lines += ["", f"Generation ({what}):", ""]
        lines += ["| batch | new tokens | KV cache tok/s | without tok/s | ratio |"]
        lines += ["|---:|---:|---:|---:|---:|"]
        for row in gen["rows"]:
            if "speedup" not in row:
                lines.append(f"| {row['batch']} | {row.get('skipped', '')} ||||")
                continue
            lines.append(
                f"| {row['batch']} | {row['new_tokens']} | {row['cached_tokens_per_sec']:,.0f} | "
                f"{row['uncached_tokens_per_sec']:,.0f} | {row['speedup']:.2f}x |"
            )
    data = bench.get("data") or {}
    if data:
        tokenizer = f"{data.get('tokenizer')}, {data.get('backend') or 'built in'}"
        lines += ["", f"Data: {data.get('train_tokens'):,} train tokens ({tokenizer}), "]
        lines[-1] += f"prepared in {data.get('prep_s', 0):.1f} s"
    phases = bench.get("phases") or {}
    timing = ", ".join(
        f"{k} {v.get('seconds', 0):.1f} s" for k, v in phases.items() if "seconds" in v
    )
    return lines + ["", f"Phases: {timing} (budget {bench.get('budget_s')} s)"]


def render(summary: dict[str, Any]) -> str:
    """summary.md."""
    lines = [f"# GPU check {summary['started_at']}{' (dry run)' if summary['dry_run'] else ''}", ""]
    reasons = ": " + "; ".join(summary["reasons"]) if summary["reasons"] else ""
    lines += [f"**{summary['overall'].upper()}**{reasons}", "", f"Device: {summary['device']}", ""]
    goal = summary.get("goal")
    if goal:
        met = "met" if goal["met"] else "not met"
        value = f"{goal['mfu_datasheet_compiled']:.3f}"
        lines += [f"MFU goal (compiled, vs datasheet) >= {goal['goal']}: {value}, {met}", ""]
    lines += ["| part | status | seconds | budget s | note |", "|---|---|---:|---:|---|"]
    for p in summary["parts"]:
        figures = f"{p['seconds']:.1f} | {p['budget_s']}"
        lines.append(f"| {p['part']} | {p['status']} | {figures} | {p['note']} |")
    lines += ["", f"Total: {summary['total_s']:.1f} s", ""]
    t = summary["tests"]
    order = ("passed", "failed", "error", "skipped", "xfailed", "xpassed", "interrupted")
    ranked = sorted(t["counts"].items(), key=lambda kv: (order + (kv[0],)).index(kv[0]))
    counts = ", ".join(f"{n} {k}" for k, n in ranked) or "none"
    lines += [f"## Tests (tests/gpu): {counts}", "", f"From: {t['source']}", ""]
    if t["cases"]:
        lines += ["| test | outcome | seconds |", "|---|---|---:|"]
        for c in t["cases"]:
            note = f" ({c['message']})" if c.get("message") else ""
            lines.append(f"| {c['test']} | {c['outcome']}{note} | {c.get('seconds', 0):.1f} |")
    lines += ["", "## Benchmark", "", *benchmark_lines(summary["benchmark"]), ""]
    env = summary.get("environment") or {}
    versions = ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items() if v)
    lines += ["## Versions", "", versions or "unknown (the environment step wrote nothing)"]
    if env.get("gpt2_tokenizer"):
        lines += ["", f"GPT-2 tokenizer: {env['gpt2_tokenizer']}"]
    return "\n".join(lines) + "\n"


def summarize(work: Path, out: Path, dry_run: bool, started: float) -> int:
    """Write summary.json and summary.md into ``out``; 0 when everything passed."""
    parts = read_parts(work / "parts.tsv")
    results = test_results(work, out)
    bench = read_json(out / "benchmark.json")
    facts_ = read_json(work / "facts.json")
    reasons = verdict(parts, results, bench, dry_run)
    summary = {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "total_s": time.time() - started,
        "dry_run": dry_run,
        "overall": "fail" if reasons else "pass",
        "reasons": reasons,
        "device": device_line(facts_, dry_run),
        "goal": mfu_goal(bench),
        "parts": parts,
        "tests": results,
        "benchmark": bench,
        "facts": facts_,
        "environment": read_json(work / "env.json"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    text = render(summary)
    (out / "summary.md").write_text(text, encoding="utf-8")
    print(text, end="")
    return 1 if reasons else 0


def main(argv: list[str] | None = None) -> int:
    """Dispatch to the step named first."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="step", required=True)
    sub.add_parser("facts").add_argument("file", type=Path)
    env = sub.add_parser("make-env")
    for name in ("wheelhouse", "venv", "file"):
        env.add_argument(name, type=Path)
    sub.add_parser("verify-env").add_argument("file", type=Path)
    sub.add_parser("tests").add_argument("pytest_args", nargs=argparse.REMAINDER)
    s = sub.add_parser("summary")
    s.add_argument("--work", type=Path, required=True)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--dry-run", action="store_true")
    s.add_argument("--started", type=float, default=time.time(), help="epoch seconds")
    args = p.parse_args(argv)
    if args.step == "facts":
        return facts(args.file)
    if args.step == "make-env":
        return make_env(args.wheelhouse.resolve(), args.venv.resolve(), args.file)
    if args.step == "verify-env":
        return verify_env(args.file)
    if args.step == "tests":
        given = args.pytest_args
        return tests(given[1:] if given[:1] == ["--"] else given)
    return summarize(args.work, args.out, args.dry_run, args.started)


if __name__ == "__main__":
    sys.exit(main())
