"""scripts/plant_faults.py stays in step with the code: every fault it plants still finds its
text once, and every test it names still exists (running the faults is the script's job)."""

from __future__ import annotations

import ast
import importlib.util
import sys

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "plant_faults.py"
spec = importlib.util.spec_from_file_location("plant_faults_script", SCRIPT)
faults = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = faults  # dataclasses look their module up there
spec.loader.exec_module(faults)


@pytest.mark.parametrize("fault", faults.FAULTS, ids=lambda f: f.name)
def test_each_fault_finds_its_text_once_and_its_tests_exist(fault) -> None:
    assert (ROOT / fault.path).read_text(encoding="utf-8").count(fault.old) == 1
    assert fault.old != fault.new
    for node in fault.tests:
        path, name = node.split("::")
        tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
        defined = {f.name for f in tree.body if isinstance(f, ast.FunctionDef)}
        assert name.split("[")[0] in defined, node


def test_planting_changes_only_the_copy(tmp_path) -> None:
    fault = faults.FAULTS[0]
    (tmp_path / fault.path).parent.mkdir(parents=True)
    source = (ROOT / fault.path).read_text(encoding="utf-8")
    (tmp_path / fault.path).write_text(source, encoding="utf-8")
    original = faults.plant(tmp_path, fault)
    assert original == source == (ROOT / fault.path).read_text(encoding="utf-8")
    planted = (tmp_path / fault.path).read_text(encoding="utf-8")
    assert fault.new in planted and planted.count(fault.old) == 0
