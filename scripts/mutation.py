"""Mutation score of the core modules: mutmut 3 mutates them one function at a time and runs the
fast unit tests that cover each mutated function; this writes the score and the surviving mutants
to benchmarks/mutation/REPORT.md.

    make mutation                                        # every file in [tool.mutmut] only_mutate
    make mutation ARGS="--module optim --max-children 2" # one module (repeat --module for more)
    python scripts/mutation.py --keep --module model     # add a module's verdicts to mutants/
    python scripts/mutation.py --retest                  # after new tests: re-test the survivors
    python scripts/mutation.py --report-only             # rewrite the report from mutants/ as is

A run without --keep or --retest starts afresh; the others add to the verdicts in mutants/ and
the report lists every run that gave them, with its time. Adding tests can only kill more
mutants, so re-testing the survivors gives the score a full run would; editing a mutated
function renumbers its mutants, and mutmut then tests that function's mutants again.

What is mutated and which tests run is configured in pyproject.toml's [tool.mutmut]. Mutants the
developers judged equivalent (no test could tell them apart) are listed, with the reason, in
benchmarks/mutation/equivalent.toml and leave the score's denominator. The score is a figure,
never a gate: the exit status is non-zero only when mutmut itself failed (for one, when the
unmutated tests fail, which mutmut checks first).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: mutmut itself depends on toml there
    import toml as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "mutation"
MUTANTS = ROOT / "mutants"
RUN_RECORD = MUTANTS / "mutation-run.json"  # how the last run went, for --report-only
STATUSES = ("killed", "survived", "timeout", "suspicious", "no tests", "not checked")


@dataclass
class ModuleScore:
    """The verdicts of one mutated file's mutants."""

    module: str
    by_status: dict[str, list[str]] = field(default_factory=dict)
    equivalent: list[str] = field(default_factory=list)

    def count(self, status: str) -> int:
        return len(self.by_status.get(status, []))

    @property
    def checked(self) -> int:
        """Mutants with a verdict (a run filtered to other modules leaves these 'not checked')."""
        return sum(len(v) for k, v in self.by_status.items() if k != "not checked")

    @property
    def other(self) -> int:
        """Verdicts outside the table's columns: skipped, segfault, caught by type check..."""
        return self.checked - sum(self.count(s) for s in STATUSES if s != "not checked")

    @property
    def score(self) -> float | None:
        """killed / (mutants - equivalent): timeouts and suspicious ones count as not killed."""
        judged = self.checked - len(self.equivalent)
        return self.count("killed") / judged if judged > 0 else None


def parse_results(listing: str) -> dict[str, str]:
    """``mutmut results --all true`` lines (``    minigpt.optim.x_lr_at__mutmut_3: survived``)
    -> mutant name -> status."""
    results = {}
    for line in listing.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep and "__mutmut_" in name:
            results[name] = status.strip()
    return results


def module_of(mutant: str) -> str:
    """``minigpt.optim.x_lr_at__mutmut_3`` / ``minigpt.optim.xǁAdamWǁstep__mutmut_1`` ->
    ``minigpt/optim.py``: the dotted path up to the mangled function name."""
    parts = mutant.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if parts[i].startswith(("x_", "xǁ")):
            return "/".join(parts[:i]) + ".py"
    return mutant.rsplit(".", 1)[0].replace(".", "/") + ".py"


def tally(results: dict[str, str], equivalent: dict[str, str]) -> list[ModuleScore]:
    """Per module, its mutants grouped by verdict; a survivor listed in ``equivalent`` moves to
    the module's equivalent list (a listed mutant that was killed stays killed)."""
    modules: dict[str, ModuleScore] = {}
    for name, status in sorted(results.items()):
        score = modules.setdefault(module_of(name), ModuleScore(module_of(name)))
        if status == "survived" and name in equivalent:
            score.equivalent.append(name)
        score.by_status.setdefault(status, []).append(name)
    return [modules[m] for m in sorted(modules)]


def overall(scores: list[ModuleScore]) -> ModuleScore:
    """All modules as one."""
    total = ModuleScore("all")
    for s in scores:
        for status, names in s.by_status.items():
            total.by_status.setdefault(status, []).extend(names)
        total.equivalent.extend(s.equivalent)
    return total


def load_equivalent(path: Path) -> dict[str, str]:
    """benchmarks/mutation/equivalent.toml: a plain mapping, mutant name -> why it is equivalent."""
    if not path.exists():
        return {}
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    bad = [k for k, v in data.items() if not isinstance(v, str)]
    if bad:
        raise SystemExit(f'{path}: each entry is `"mutant name" = "reason"`; not so: {bad}')
    return data


def _pct(x: float | None) -> str:
    """Rounded down: 2,577 killed of 2,578 is 99.9%, never 100.0%."""
    return "–" if x is None else f"{math.floor(1000 * x + 1e-9) / 10:.1f}%"


def table(scores: list[ModuleScore]) -> list[str]:
    """The Markdown table of per-module counts and scores, with the overall row last."""
    head = "| module | mutants | killed | survived | timeout | suspicious | no tests | other "
    head += "| equivalent | score |"
    lines = [head, "|" + "---|" * 10]
    for s in [*scores, overall(scores)]:
        name = f"**{s.module}**" if s.module == "all" else f"`{s.module}`"
        counts = [s.checked, *(s.count(k) for k in STATUSES[:5]), s.other, len(s.equivalent)]
        counts[2] -= len(s.equivalent)  # survived: the columns add up to the mutants
        lines.append(f"| {name} | " + " | ".join(map(str, counts)) + f" | {_pct(s.score)} |")
    return lines


def stale_equivalents(results: dict[str, str], equivalent: dict[str, str]) -> list[str]:
    """Listed names that are no surviving mutant: killed now, or renumbered by a source change
    (mutmut numbers a function's mutants in order, so editing a function renames them)."""
    return sorted(n for n in equivalent if results.get(n) != "survived")


@dataclass
class Run:
    """How one mutmut run went, for the report's header."""

    command: str
    wall_s: float | None
    mutant_phase_s: float | None  # from mutmut's "Running mutation testing" to its end
    load_before: tuple[float, ...]
    load_after: tuple[float, ...]
    threads: str
    mutants: int | None = None  # verdicts this run gave (a --keep run tests only some)


def save_runs(runs: list[Run], path: Path) -> None:
    path.write_text(json.dumps([r.__dict__ for r in runs]), encoding="utf-8")


def load_runs(path: Path) -> list[Run]:
    """The runs that gave mutants/ its verdicts, oldest first; [] when there is no record."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    runs = []
    for item in data if isinstance(data, list) else [data]:  # one dict: an older record
        item["load_before"], item["load_after"] = (
            tuple(item[k]) for k in ("load_before", "load_after")
        )
        runs.append(Run(**item))
    return runs


def render(
    runs: list[Run],
    results: dict[str, str],
    equivalent: dict[str, str],
    diffs: dict[str, str],
) -> str:
    """The whole REPORT.md."""
    scores = [s for s in tally(results, equivalent) if s.checked]
    unchecked = sorted(s.module for s in tally(results, equivalent) if not s.checked)
    total = overall(scores)
    lines = [
        "# Mutation score",
        "",
        "Written by `scripts/mutation.py` (`make mutation`); see benchmarks/README.md, "
        '"Mutation score". A figure, never asserted.',
        "",
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- mutmut {_version('mutmut')}, torch {_version('torch')}, Python "
        f"{platform.python_version()}; {os.cpu_count()} cores",
    ]
    if not runs:
        lines.append("- runs: no record of the runs that gave these verdicts")
    for i, run in enumerate(runs, 1):
        lines += _run_lines(run, i if len(runs) > 1 else None, total.checked)
    if len(runs) > 1:
        timed = [r.wall_s for r in runs if r.wall_s]
        lines.append(
            f"- in all: {sum(timed) / 60:.1f} min over {len(runs)} runs; the verdicts of a later "
            "run replace an earlier one's for the mutants it re-tested"
        )
    if len(runs) == 1:
        lines += _extrapolation(runs[0], results, total.checked)
    lines += ["", "## Score per module", ""]
    lines += [
        "score = killed / (mutants − equivalent); a timeout or suspicious mutant counts as not "
        "killed; *no tests*: no unit test calls the mutated function.",
        "",
        *table(scores),
        "",
    ]
    pending = total.count("not checked")
    if pending:
        lines += [
            f"{pending} mutants of these modules have no verdict (the run was stopped): the "
            "score covers the others.",
            "",
        ]
    if unchecked:
        lines += [
            f"Not run this time (filtered out): {', '.join(f'`{m}`' for m in unchecked)}.",
            "",
        ]
    lines += _survivors(total, diffs)
    lines += _equivalents(total, equivalent, diffs)
    stale = stale_equivalents(results, equivalent)
    if stale:
        lines += [
            "## Stale entries of equivalent.toml",
            "",
            "Listed as equivalent but not a survivor of this run (killed, not run, or renumbered "
            "by an edit of its function): re-check and update the file.",
            "",
            *(f"- `{n}`: {results.get(n, 'no such mutant')}" for n in stale),
            "",
        ]
    return "\n".join(lines).rstrip() + "\n"


def _extrapolation(run: Run, results: dict[str, str], checked: int) -> list[str]:
    """For a run filtered to some modules: the time all configured modules would take, the fixed
    cost (generation, the recorded test pass, the clean run) once plus every mutant at this pace."""
    everything = len(results)
    if checked == 0 or everything <= checked or not run.wall_s:
        return []
    rate = _rate(run, checked)
    fixed = max(0.0, run.wall_s - checked / rate)
    hours = (fixed + everything / rate) / 3600
    return [
        f"- all configured modules: {everything} mutants; at this run's pace about {hours:.1f} h "
        "(rough: each mutant runs the tests that cover its function, and those differ by module)"
    ]


def _run_lines(run: Run, number: int | None, checked: int) -> list[str]:
    """One run's command, machine load and pace."""
    head = f"- run {number}: " if number else "- "
    lines = [
        f"{head}command: `{run.command}`",
        f"  - load average {_load(run.load_before)} before, {_load(run.load_after)} after; "
        f"OMP_NUM_THREADS={run.threads}",
    ]
    if run.wall_s is None:
        return lines
    n = run.mutants if run.mutants is not None or number else checked  # one run: all of them
    if n is None:  # a run stopped by hand before it could count
        lines.append(f"  - wall time: {run.wall_s / 60:.1f} min (how many mutants: not recorded)")
        return lines
    per_s = n / run.wall_s if run.wall_s else 0
    lines.append(
        f"  - wall time: {run.wall_s / 60:.1f} min for {n} mutants ({per_s:.2f} mutants/s "
        "overall, generation and test-coverage collection included"
        + (f"; the mutants alone: {_rate(run, n):.3f} mutants/s" if run.mutant_phase_s else "")
        + ")"
    )
    return lines


def _survivors(total: ModuleScore, diffs: dict[str, str]) -> list[str]:
    """Every mutant the score counts as not killed: survivors, then timeouts and the rest."""
    held = [
        (n, status)
        for status in ("survived", "timeout", "suspicious", "no tests")
        for n in total.by_status.get(status, [])
        if n not in total.equivalent
    ]
    lines = [f"## Surviving mutants ({len(held)})", ""]
    if not held:
        return [*lines, "None.", ""]
    lines += [
        "Each is a change to the code that no unit test noticed (or, for a timeout, that made "
        "the tests run past mutmut's time limit): a missing test, or an equivalent mutant to "
        "list in equivalent.toml with the reason.",
        "",
    ]
    for name, status in held:
        diff = diffs.get(name, "(no diff)").strip()
        lines += [f"### `{name}` ({status})", "", "```diff", diff, "```", ""]
    return lines


def _equivalents(
    total: ModuleScore, equivalent: dict[str, str], diffs: dict[str, str]
) -> list[str]:
    if not total.equivalent:
        return []
    lines = [f"## Equivalent mutants ({len(total.equivalent)})", ""]
    for name in total.equivalent:
        lines += [f"### `{name}`", "", equivalent[name], ""]
        lines += ["```diff", diffs.get(name, "(no diff)").strip(), "```", ""]
    return lines


def _load(avg: tuple[float, ...]) -> str:
    return " / ".join(f"{x:.1f}" for x in avg) if avg else "?"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _mutmut() -> list[str]:
    """The mutmut of this Python's environment (its console script sits beside the interpreter)."""
    exe = Path(sys.executable).parent / "mutmut"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("mutmut")
    if found is None:
        raise SystemExit("mutmut is not installed: pip install -e '.[mutation]' (or make env)")
    return [found]


def run_mutmut(argv: list[str], env: dict[str, str], log: Path) -> tuple[int, float, float | None]:
    """Run mutmut from the repository root, echoing its output; (exit status, seconds, seconds
    since it began testing mutants)."""
    start = time.monotonic()
    phase_start = None
    proc = subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    chunks = []
    assert proc.stdout is not None
    for chunk in iter(lambda: proc.stdout.read1(4096), b""):
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
        chunks.append(chunk)
        if phase_start is None and b"Running mutation testing" in b"".join(chunks[-2:]):
            phase_start = time.monotonic()
    rc = proc.wait()
    output = b"".join(chunks).decode(errors="replace")
    if MUTANTS.exists():
        log.write_text(output, encoding="utf-8")
    end = time.monotonic()
    return rc, end - start, (end - phase_start if phase_start else None)


def _rate(run: Run, checked: int) -> float:
    """Mutants per second over mutmut's mutant phase (the whole run where that is unknown)."""
    seconds = run.mutant_phase_s or run.wall_s or 1.0
    return checked / seconds


def read_results(env: dict[str, str]) -> dict[str, str]:
    """Every mutant of the configured files and its verdict, as ``mutmut results`` lists them."""
    argv = [*_mutmut(), "results", "--all", "true"]
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"mutmut results failed ({proc.returncode}):\n{proc.stderr}")
    return parse_results(proc.stdout)


def show(names: list[str], env: dict[str, str]) -> dict[str, str]:
    """``mutmut show`` of each mutant: its diff against the source (the header line dropped)."""
    diffs = {}
    for name in names:
        proc = subprocess.run(
            [*_mutmut(), "show", name], cwd=ROOT, env=env, capture_output=True, text=True
        )
        text = proc.stdout if proc.returncode == 0 else proc.stderr
        diffs[name] = "\n".join(line for line in text.splitlines() if not line.startswith("# "))
    return diffs


def module_globs(modules: list[str]) -> list[str]:
    """``optim``, ``minigpt/optim.py`` or ``minigpt.optim`` -> mutmut's ``minigpt.optim.*``; a
    name that already holds a ``*`` passes as it is (mutmut matches mutant names with fnmatch)."""
    globs = []
    for m in modules:
        if "*" in m:
            globs.append(m)
            continue
        dotted = m.removesuffix(".py").replace("/", ".")
        if not dotted.startswith("minigpt."):
            dotted = "minigpt." + dotted
        globs.append(dotted + ".*")
    return globs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--max-children", type=int, default=None, help="mutants tested at once")
    p.add_argument(
        "--module",
        action="append",
        default=[],
        help="mutate-and-test only this module (optim, minigpt/optim.py) or mutant glob",
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="reuse mutants/ and its verdicts: test only the mutants with none (of new or "
        "edited functions, or not reached before), within --module if given. Default: start "
        "afresh",
    )
    p.add_argument(
        "--retest",
        action="store_true",
        help="with mutants/ kept: re-test its survivors, timeouts and untested (not those "
        "listed as equivalent) against today's tests, e.g. after adding tests; the others' "
        "verdicts stand. "
        "With --keep, also test the mutants without a verdict, in the same mutmut run",
    )
    p.add_argument("--report-only", action="store_true", help="no run: report mutants/ as it is")
    p.add_argument("--output", type=Path, default=OUT / "REPORT.md")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cores = os.cpu_count() or 1
    children = args.max_children or cores
    env = dict(os.environ)
    # One torch thread per mutant process unless told otherwise: mutmut's time limit is CPU time,
    # which threads multiply, and more threads than cores only spin.
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores // children)))
    equivalent = load_equivalent(OUT / "equivalent.toml")
    fresh = not (args.keep or args.retest or args.report_only)
    runs = [] if fresh else load_runs(RUN_RECORD)
    if not args.report_only:
        if fresh:
            shutil.rmtree(MUTANTS, ignore_errors=True)
        names = module_globs(args.module)
        shown = " ".join(names)
        if args.retest:
            if not MUTANTS.exists():
                raise SystemExit("--retest needs the mutants/ of an earlier run")
            results = read_results(env)
            globs = names
            names = retest_names(results, equivalent, globs)
            shown = f"<the {len(names)} survivors and timeouts of the runs before"
            if args.keep:  # and the mutants not reached yet
                fresh_ones = _unchecked(results, globs)
                names += fresh_ones
                shown += f", and {len(fresh_ones)} mutants without a verdict"
            shown += ">"
        elif args.keep and names and MUTANTS.exists():
            # Named one by one, mutmut would test again those with a verdict: name the others.
            names = _unchecked(read_results(env), names)
            shown += f" (the {len(names)} without a verdict)"
        if (args.retest or (args.keep and args.module)) and not names:
            print("nothing to test: every mutant asked for has its verdict")
        else:
            rc = _run_and_record(runs, names, shown, children, env)
            if rc != 0:
                return rc
    results = read_results(env)
    if not results:
        print("no mutants found: run without --report-only first", file=sys.stderr)
        return 1
    listed = [
        n for n, s in results.items() if s in ("survived", "timeout", "suspicious", "no tests")
    ]
    report = render(runs, results, equivalent, show(listed, env))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report, encoding="utf-8")
    total = overall([s for s in tally(results, equivalent) if s.checked])
    judged = total.checked - len(total.equivalent)
    waiting = _unchecked(results, [])
    print(
        f"\nmutation score: {_pct(total.score)} ({total.count('killed')} killed of {judged} "
        f"non-equivalent mutants with a verdict; {len(waiting)} without one); "
        f"report: {args.output}"
    )
    if waiting and (args.keep or args.retest):
        # The names to test come from the verdicts before the run; mutmut makes the mutants of
        # a new or changed function only as the run starts, so they wait for the next one.
        print(
            f"{len(waiting)} mutants have no verdict (new or changed functions are mutated as "
            "the run starts, after the names to test were chosen): run the same command again"
        )
    return 0


def _run_and_record(
    runs: list[Run], names: list[str], shown: str, children: int, env: dict[str, str]
) -> int:
    """Run mutmut on ``names`` (all mutants without a verdict when empty); add the run to the
    record in mutants/."""
    run = Run(
        f"mutmut run --max-children {children} {shown}".rstrip(),
        None,
        None,
        (),
        (),
        env["OMP_NUM_THREADS"],
    )
    explicit = bool(names) and not any("*" in n for n in names)
    before = _verdicts(read_results(env)) if MUTANTS.exists() and not explicit else 0
    run.load_before = os.getloadavg()
    rc, run.wall_s, run.mutant_phase_s = run_mutmut(
        [*_mutmut(), "run", "--max-children", str(children), *names],
        env,
        MUTANTS / f"run{len(runs) + 1}.log",
    )
    run.load_after = os.getloadavg()
    if rc != 0:
        print(f"\nmutmut failed (exit {rc}); its output: mutants/run*.log", file=sys.stderr)
        return rc
    run.mutants = len(names) if explicit else _verdicts(read_results(env)) - before
    runs.append(run)
    save_runs(runs, RUN_RECORD)
    return 0


def retest_names(
    results: dict[str, str], equivalent: dict[str, str], globs: list[str]
) -> list[str]:
    """The mutants worth testing again: survivors, timeouts and those no test reached, not
    judged equivalent (named one by one, mutmut re-tests them though they have a verdict),
    within ``globs`` if given."""
    return sorted(
        n
        for n, status in results.items()
        if status in ("survived", "timeout", "no tests")
        and n not in equivalent
        and (not globs or _matches(n, globs))
    )


def _unchecked(results: dict[str, str], globs: list[str]) -> list[str]:
    """Mutants without a verdict, within ``globs`` if given."""
    return sorted(
        n for n, s in results.items() if s == "not checked" and (not globs or _matches(n, globs))
    )


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def _verdicts(results: dict[str, str]) -> int:
    return sum(1 for s in results.values() if s != "not checked")


if __name__ == "__main__":
    sys.exit(main())
