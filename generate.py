"""Sample text from a checkpoint: ``python generate.py checkpoint=PATH prompt="def main("``."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from minigpt.cli import quote_free_text, run_main, user_errors_as_one_line
from minigpt.config import register_configs, to_object

register_configs()


@hydra.main(config_path="conf", config_name="generate", version_base="1.3")
@user_errors_as_one_line
def main(cfg: DictConfig) -> None:
    """Print each sample, prompt first, streamed token by token."""
    from minigpt.sample import print_samples  # after Hydra has parsed the command line

    print_samples(to_object(cfg))


if __name__ == "__main__":
    # Prompts are text and these are file names, never Hydra syntax or ${...} interpolations.
    paths = ("checkpoint", "prompt_file")
    sys.argv[1:] = quote_free_text(sys.argv[1:], keys=("prompt",), paths=paths)
    run_main(main)
