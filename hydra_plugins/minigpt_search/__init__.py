"""minigpt's Bayesian search: ``hydra/sweeper=search`` (Optuna TPE, ask/tell); see sweeper.py."""
