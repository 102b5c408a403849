"""scripts/mutation.py's reading of mutmut's verdicts, without running mutmut: the listing it
parses, the score it computes, and how equivalent.toml moves survivors out of the denominator."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "mutation.py"
spec = importlib.util.spec_from_file_location("mutation_script", SCRIPT)
mut = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = mut  # dataclasses look their module up there
spec.loader.exec_module(mut)

# `mutmut results --all true` as mutmut 3.8.1 prints it.
LISTING = """\
    minigpt.optim.x_lr_at__mutmut_1: killed
    minigpt.optim.x_lr_at__mutmut_2: survived
    minigpt.optim.x_lr_at__mutmut_3: timeout
    minigpt.optim.xǁAdamWǁstep__mutmut_1: survived
    minigpt.optim.x_set_lr__mutmut_1: no tests
    minigpt.sample.x_top_k__mutmut_1: killed
    minigpt.sample.x_top_k__mutmut_2: not checked
"""


def test_results_listing_parses_to_name_and_status() -> None:
    results = mut.parse_results(LISTING + "some other line\n")
    assert len(results) == 7
    assert results["minigpt.optim.x_lr_at__mutmut_2"] == "survived"
    assert results["minigpt.optim.xǁAdamWǁstep__mutmut_1"] == "survived"
    assert results["minigpt.optim.x_set_lr__mutmut_1"] == "no tests"


@pytest.mark.parametrize(
    ("mutant", "module"),
    [
        ("minigpt.optim.x_lr_at__mutmut_3", "minigpt/optim.py"),
        ("minigpt.optim.xǁAdamWǁstep__mutmut_1", "minigpt/optim.py"),
        ("minigpt.config.x_check__mutmut_10", "minigpt/config.py"),
    ],
)
def test_mutant_names_map_to_their_file(mutant: str, module: str) -> None:
    assert mut.module_of(mutant) == module


def test_score_is_killed_over_mutants_less_equivalent() -> None:
    results = mut.parse_results(LISTING)
    equivalent = {"minigpt.optim.xǁAdamWǁstep__mutmut_1": "step's closure is never passed"}
    optim, sample = mut.tally(results, equivalent)
    assert optim.module == "minigpt/optim.py" and optim.checked == 5
    assert optim.equivalent == ["minigpt.optim.xǁAdamWǁstep__mutmut_1"]
    assert optim.score == pytest.approx(1 / 4)  # the timeout counts as not killed
    assert sample.checked == 1 and sample.score == 1.0  # 'not checked' is no verdict
    assert mut.overall([optim, sample]).score == pytest.approx(2 / 5)


def test_killed_or_unknown_equivalents_are_reported_stale() -> None:
    results = mut.parse_results(LISTING)
    equivalent = {
        "minigpt.optim.x_lr_at__mutmut_1": "killed now",
        "minigpt.optim.x_lr_at__mutmut_2": "still survives",
        "minigpt.optim.x_lr_at__mutmut_99": "renumbered",
    }
    (optim, _) = mut.tally(results, equivalent)
    assert optim.equivalent == ["minigpt.optim.x_lr_at__mutmut_2"]
    assert mut.stale_equivalents(results, equivalent) == [
        "minigpt.optim.x_lr_at__mutmut_1",
        "minigpt.optim.x_lr_at__mutmut_99",
    ]


def test_equivalent_file_is_a_mapping_of_names_to_reasons(tmp_path: Path) -> None:
    path = tmp_path / "equivalent.toml"
    assert mut.load_equivalent(path) == {}
    path.write_text('"minigpt.optim.x_lr_at__mutmut_2" = "lr is clamped anyway"\n')
    assert mut.load_equivalent(path) == {"minigpt.optim.x_lr_at__mutmut_2": "lr is clamped anyway"}
    path.write_text('"minigpt.optim.x_lr_at__mutmut_2" = 1\n')
    with pytest.raises(SystemExit, match="reason"):
        mut.load_equivalent(path)


def test_report_lists_survivors_with_diffs_and_equivalents_with_reasons() -> None:
    results = mut.parse_results(LISTING)
    equivalent = {"minigpt.optim.xǁAdamWǁstep__mutmut_1": "step's closure is never passed"}
    run = mut.Run("mutmut run --max-children 1", 60.0, 40.0, (1.0,), (2.0,), "1")
    diffs = {"minigpt.optim.x_lr_at__mutmut_2": "-    return a\n+    return b"}
    report = mut.render([run], results, equivalent, diffs)
    assert "| `minigpt/optim.py` | 5 | 1 | 1 | 1 | 0 | 1 | 0 | 1 | 25.0% |" in report
    assert "| **all** | 6 | 2 | 1 | 1 | 0 | 1 | 0 | 1 | 40.0% |" in report
    # The survivor with its diff, and the timeout and the untested one, which the score counts
    # as not killed too.
    assert "## Surviving mutants (3)" in report and "+    return b" in report
    assert "### `minigpt.optim.x_lr_at__mutmut_2` (survived)" in report
    assert "### `minigpt.optim.x_lr_at__mutmut_3` (timeout)" in report
    assert "### `minigpt.optim.x_set_lr__mutmut_1` (no tests)" in report
    assert "step's closure is never passed" in report


@pytest.mark.parametrize(
    ("given", "glob"),
    [
        ("optim", "minigpt.optim.*"),
        ("minigpt/optim.py", "minigpt.optim.*"),
        ("minigpt.trainer.xǁTrainerǁ_train_step*", "minigpt.trainer.xǁTrainerǁ_train_step*"),
    ],
)
def test_module_filter_becomes_a_mutant_glob(given: str, glob: str) -> None:
    assert mut.module_globs([given]) == [glob]


def test_a_stopped_run_reports_its_pending_mutants_and_keeps_its_record(tmp_path: Path) -> None:
    run = mut.Run("mutmut run --max-children 1 minigpt.optim.*", 600.0, None, (7.5,), (6.0,), "1")
    mut.save_runs([run], tmp_path / "run.json")
    assert mut.load_runs(tmp_path / "run.json") == [run]
    assert mut.load_runs(tmp_path / "missing.json") == []
    report = mut.render([run], mut.parse_results(LISTING), {}, {})
    assert "1 mutants of these modules have no verdict" in report  # sample's 'not checked'


def test_a_record_of_one_run_from_before_histories_still_loads(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text(
        '{"command": "mutmut run", "wall_s": 5.0, "mutant_phase_s": 4.0, "load_before": [1.0], '
        '"load_after": [2.0], "threads": "1"}'
    )
    assert mut.load_runs(tmp_path / "run.json") == [
        mut.Run("mutmut run", 5.0, 4.0, (1.0,), (2.0,), "1")
    ]


def test_every_run_that_gave_verdicts_is_reported_with_its_time() -> None:
    first = mut.Run("mutmut run minigpt.optim.*", 600.0, 500.0, (2.0,), (2.0,), "1", mutants=6)
    retest = mut.Run("mutmut run <the 2 survivors>", 120.0, 60.0, (2.0,), (2.0,), "1", mutants=2)
    report = mut.render([first, retest], mut.parse_results(LISTING), {}, {})
    assert "- run 1: command: `mutmut run minigpt.optim.*`" in report
    assert "wall time: 10.0 min for 6 mutants" in report
    assert "- run 2: command: `mutmut run <the 2 survivors>`" in report
    assert "wall time: 2.0 min for 2 mutants" in report
    assert "- in all: 12.0 min over 2 runs" in report


def test_retest_takes_survivors_timeouts_and_untested_not_equivalents_within_the_filter() -> None:
    results = mut.parse_results(LISTING)
    equivalent = {"minigpt.optim.xǁAdamWǁstep__mutmut_1": "step's closure is never passed"}
    assert mut.retest_names(results, equivalent, []) == [
        "minigpt.optim.x_lr_at__mutmut_2",
        "minigpt.optim.x_lr_at__mutmut_3",
        "minigpt.optim.x_set_lr__mutmut_1",
    ]
    assert mut.retest_names(results, {}, ["minigpt.sample.*"]) == []
    assert mut._unchecked(results, []) == ["minigpt.sample.x_top_k__mutmut_2"]
    assert mut._unchecked(results, ["minigpt.optim.*"]) == []


def test_a_score_short_of_every_mutant_never_shows_as_100_percent() -> None:
    assert mut._pct(2577 / 2578) == "99.9%" and mut._pct(1.0) == "100.0%"
    assert mut._pct(0.25) == "25.0%" and mut._pct(None) == "–"
