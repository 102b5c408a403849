"""train.py's file names reach the config as typed, even with characters Hydra's grammar uses."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from minigpt.cli import quote_paths
from minigpt.config import register_configs, to_object
from tests.conftest import ROOT

PATHS = ("hydra.run.dir", "hydra.sweep.dir", "data.cache_dir", "resume")  # as train.py


@pytest.mark.parametrize(
    "path", ["/runs/a,b", "/runs/[1]/x=2", "/runs/a b/c", "runs/it's", "/plain/path", "~/x"]
)
def test_typed_file_names_reach_the_config_unchanged(path: str) -> None:
    overrides = quote_paths([f"data.cache_dir={path}", f"resume={path}/last.pt"], PATHS)
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = to_object(compose(config_name="config", overrides=overrides))
    assert (cfg.data.cache_dir, cfg.resume) == (path, f"{path}/last.pt")


def test_interpolations_and_sweeps_are_left_to_hydra() -> None:
    typed = ["hydra.run.dir=out/${now:%H-%M}", "-m", "resume=a.pt,b.pt"]
    assert quote_paths(typed, PATHS) == typed
    assert quote_paths(["resume=a,b.pt"], PATHS) == ["resume='a,b.pt'"]


@pytest.mark.parametrize("follower", [False, True], ids=["rank0", "follower"])
def test_train_log_waits_for_its_first_line_and_followers_keep_stdout_logging(
    follower: bool,
) -> None:
    """A refused run must leave no empty train.log behind; followers log to stdout only."""
    overrides = ["hydra/job_logging=stdout"] if follower else []
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    handlers = cfg.hydra.job_logging.handlers
    assert ("file" not in handlers) if follower else handlers.file.delay is True
