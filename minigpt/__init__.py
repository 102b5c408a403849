"""minigpt: a Hydra-configured GPT-2 training platform, from one CPU to SLURM clusters."""

__version__ = "0.1.0"
