"""scripts/wheelhouse.py's own logic, without the network: what it asks pip for, what it leaves to
the image, what it refuses to carry, and the hub-cache layout minigpt reads GPT-2 from."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "wheelhouse.py"
spec = importlib.util.spec_from_file_location("wheelhouse_script", SCRIPT)
wh = importlib.util.module_from_spec(spec)
spec.loader.exec_module(wh)


def test_requirements_are_pyproject_dependencies_plus_pytest() -> None:
    reqs = wh.project_requirements(ROOT / "pyproject.toml")
    names = [wh.canonical(r.split(">")[0].split("=")[0]) for r in reqs]
    assert names[:3] == ["torch", "hydra-core", "omegaconf"]
    assert "pytest>=7.4" in reqs and "wandb>=0.16" in reqs and "datasets>=4.0" in reqs
    assert "ruff" not in names  # dev tools other than pytest stay out


def test_freeze_lines_parse_to_names_and_versions() -> None:
    text = "\n".join(
        [
            "# a comment",
            "torch==2.11.0+cu130",
            "Foo_Bar.baz==1.0  # trailing",
            "mylib @ file:///build/mylib-1.0-py3-none-any.whl",
            "-e git+https://example.org/x.git#egg=x",
            "pytest",
            "arcane===1.0-weird",
        ]
    )
    assert wh.parse_have(text) == {
        "torch": "2.11.0+cu130",
        "foo-bar-baz": "1.0",
        "mylib": None,
        "pytest": None,
        "arcane": "1.0-weird",
    }


def test_stock_image_leaves_only_hydra_wandb_datasets_to_carry() -> None:
    have = wh.parse_have(wh.DEFAULT_HAVE.read_text())
    assert have["torch"] == "2.11.0" and have["numpy"] == "2.5.2" and "pyarrow" in have
    needed = wh.needed_requirements(wh.project_requirements(ROOT / "pyproject.toml"), have)
    assert needed == [
        "hydra-core>=1.3",
        "omegaconf>=2.3",
        "hydra-submitit-launcher>=1.2",
        "wandb>=0.16",
        "datasets>=4.0",
    ]


def test_torch_family_is_never_required_even_from_a_bare_image() -> None:
    needed = wh.needed_requirements(["torch>=2.3", "triton", "nvidia-cublas-cu12", "tqdm"], {})
    assert needed == ["tqdm"]
    for name in ("torch", "Triton", "nvidia_nccl_cu13", "pytorch-triton-rocm"):
        assert wh.is_torch_family(name), name
    assert not wh.is_torch_family("torchmetrics") and not wh.is_torch_family("numpy")


def test_an_image_package_too_old_for_minigpt_is_an_error_not_a_second_copy() -> None:
    with pytest.raises(wh.WheelhouseError, match=r"image's numpy 1\.21\.0 does not meet"):
        wh.needed_requirements(["numpy>=1.24"], {"numpy": "1.21.0"})
    assert wh.needed_requirements(["numpy>=1.24"], {"numpy": None}) == []  # unknown: trusted


def test_image_versions_become_constraints_without_local_labels() -> None:
    have = {"torch": "2.11.0+cu130", "numpy": "2.5.2", "pandas": None}
    assert wh.image_constraints(have) == ["numpy==2.5.2", "torch==2.11.0"]


def test_platform_expands_to_every_older_manylinux_tag() -> None:
    tags = wh.platform_tags("manylinux_2_28_x86_64")
    assert tags[0] == "manylinux_2_28_x86_64" and tags.index("manylinux_2_17_x86_64") > 0
    assert {"manylinux_2_27_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"} <= set(tags)
    old = wh.platform_tags("manylinux_2_12_aarch64")
    assert old[-2:] == ["manylinux2010_aarch64", "manylinux1_aarch64"]
    assert "manylinux2014_aarch64" not in old  # glibc 2.17: newer than the node's 2.12
    assert wh.platform_tags("win_amd64") == ["win_amd64"]


def test_markers_are_evaluated_as_the_target_python() -> None:
    env = wh.marker_environment("3.12", "manylinux_2_28_x86_64")
    assert env["python_version"] == "3.12" and env["python_full_version"] == "3.12.0"
    assert env["sys_platform"] == "linux" and env["platform_machine"] == "x86_64"
    assert "sys_platform" not in wh.marker_environment("3.12.3", "macosx_11_0_arm64")


def test_pip_failures_name_the_requirements_without_a_wheel() -> None:
    output = (
        "The conflict is caused by:\n"
        "    hydra-core 1.3.2 depends on antlr4-python3-runtime==4.9.*\n"
        "    hydra-core 1.3.1 depends on antlr4-python3-runtime==4.9.*\n"
        "ERROR: No matching distribution found for foo<2;\n"
    )
    assert wh.blocking_requirements(output) == ["foo<2", "antlr4-python3-runtime==4.9.*"]


def _touch(folder: Path, name: str, size: int = 10) -> Path:
    path = folder / name
    path.write_bytes(b"\0" * size)
    return path


def test_the_image_and_torch_family_wheels_are_left_out(tmp_path: Path) -> None:
    closure = [
        _touch(tmp_path, "hydra_core-1.3.8-py3-none-any.whl"),
        _touch(tmp_path, "numpy-2.5.2-cp312-cp312-manylinux_2_28_x86_64.whl"),
        _touch(tmp_path, "nvidia_cublas-13.0-py3-none-manylinux_2_28_x86_64.whl"),
    ]
    kept = wh.carried(closure, {"numpy": "2.5.2"})
    assert [p.name for p in kept] == ["hydra_core-1.3.8-py3-none-any.whl"]
    with pytest.raises(wh.WheelhouseError, match="not wheels"):
        wh.carried([*closure, _touch(tmp_path, "antlr-4.9.3.tar.gz")], {})


def test_folder_check_refuses_a_torch_wheel_and_more_than_the_limit(tmp_path: Path) -> None:
    _touch(tmp_path, "omegaconf-2.3.1-py3-none-any.whl", 600_000)
    assert wh.check_folder(tmp_path, limit_mb=1) == 600_000
    _touch(tmp_path, "wandb-0.31.0-py3-none-manylinux_2_28_x86_64.whl", 500_000)
    with pytest.raises(wh.WheelhouseError, match=r"1\.1 MB, over the 1 MB limit"):
        wh.check_folder(tmp_path, limit_mb=1)
    _touch(tmp_path, "torch-2.11.0-cp312-cp312-manylinux_2_28_x86_64.whl")
    with pytest.raises(wh.WheelhouseError, match="torch-2.11.0.*only the image's"):
        wh.check_folder(tmp_path, limit_mb=100)


def test_requirements_file_pins_and_stays_offline(tmp_path: Path) -> None:
    wh.write_requirements(tmp_path, ["hydra-core==1.3.8"], wh.DEFAULT_HAVE)
    lines = (tmp_path / "requirements.txt").read_text().splitlines()
    assert lines[0] == wh.HEADER and "# image packages: scripts/gpu_image_packages.txt" in lines
    assert lines[-3:] == ["--no-index", "--find-links .", "hydra-core==1.3.8"]


def test_out_folder_is_reused_only_when_it_is_a_wheelhouse(tmp_path: Path) -> None:
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    with pytest.raises(wh.WheelhouseError, match="not empty and not a wheelhouse"):
        wh.prepare_out(other)
    assert (other / "todo.txt").exists()
    old = tmp_path / "wheelhouse"
    wh.prepare_out(old)
    wh.write_requirements(old, [], wh.DEFAULT_HAVE)
    _touch(old, "stale-1.0-py3-none-any.whl")
    wh.prepare_out(old)
    assert old.is_dir() and not any(old.iterdir())


def _fake_gpt2_tokenizer(folder: Path) -> None:
    """A tokenizers BPE of GPT-2's size: 50257 ids, <|endoftext|> last."""
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(50256)} | {"<|endoftext|>": 50256}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.add_special_tokens(["<|endoftext|>"])
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (folder / "model.safetensors").write_bytes(b"weights stay behind")


def test_gpt2_tokenizer_lands_where_minigpt_finds_it_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from minigpt.tokenizer import gpt2_hub_file

    source, out = tmp_path / "gpt2", tmp_path / "wheelhouse"
    _fake_gpt2_tokenizer(source)
    snapshot = wh.add_gpt2_tokenizer(out, source)
    assert sorted(p.name for p in snapshot.iterdir()) == ["config.json", "tokenizer.json"]
    monkeypatch.setenv("HF_HUB_CACHE", str(out / "hf_hub"))
    assert gpt2_hub_file() == str(snapshot / "tokenizer.json")


def test_a_tokenizer_that_is_not_gpt2s_is_refused(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0}}}))
    with pytest.raises(wh.WheelhouseError, match="is not GPT-2's"):
        wh.add_gpt2_tokenizer(tmp_path / "out", tmp_path / "src")
    with pytest.raises(wh.WheelhouseError, match="has no tokenizer.json"):
        wh.add_gpt2_tokenizer(tmp_path / "out", tmp_path)
