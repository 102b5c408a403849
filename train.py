"""Train a GPT: ``python train.py [group=option ...] [key=value ...]`` (see README.md)."""

from __future__ import annotations

import signal
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from minigpt.cli import (
    fail,
    follower_overrides,
    hydra_record,
    job_info,
    quote_paths,
    run_main,
    user_errors_as_one_line,
)
from minigpt.config import register_configs, to_object

register_configs()


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
@user_errors_as_one_line
def main(cfg: DictConfig) -> float:
    """Returns the final validation loss, so that Hydra sweepers (Optuna, Ax) can minimise it."""
    from minigpt.signals import StopRequested  # after Hydra has parsed the command line
    from minigpt.trainer import TrainingError, train

    config = to_object(cfg)
    hydra_cfg = HydraConfig.get()
    try:
        overrides = list(hydra_cfg.overrides.task)
        record = hydra_record(cfg, hydra_cfg)
        return train(config, hydra_cfg.runtime.output_dir, overrides, job_info(hydra_cfg), record)
    except TrainingError as err:
        fail(str(err), 1)
    except StopRequested as stop:
        # Stopping anyway, checkpoint written: a second Ctrl-C must not make it a traceback.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print(f"{stop}; run the same command again to resume", file=sys.stderr, flush=True)
        sys.exit(stop.exit_code)


if __name__ == "__main__":
    paths = ("hydra.run.dir", "hydra.sweep.dir", "data.cache_dir", "resume", "init_from")
    sys.argv[1:] = quote_paths(sys.argv[1:], paths)
    sys.argv += follower_overrides(sys.argv[1:])
    run_main(main)
