"""What the entry points share: one-line user errors, and Hydra settings for follower ranks."""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from minigpt import distributed
from minigpt.checkpoint import CheckpointError
from minigpt.config import ConfigError

USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, CheckpointError)
EXIT_USER_ERROR = 2

F = TypeVar("F", bound=Callable[..., Any])


def user_errors_as_one_line(fn: F) -> F:
    """Print a user's mistake as one ``error: ...`` line and exit 2; bugs keep their traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)

    return wrapper  # type: ignore[return-value]


def follower_overrides(argv: list[str]) -> list[str]:
    """Hydra overrides that keep ranks other than 0 from making run folders of their own.

    Under torchrun or srun every rank runs ``train.py``; each Hydra would make its own
    timestamped folder. Followers write nothing and are told rank 0's folder by the trainer.
    """
    if distributed.detect().rank == 0 or any(a.startswith(("-m", "--multirun")) for a in argv):
        return []
    return ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout"]


def quote_free_text(argv: list[str], keys: tuple[str, ...]) -> list[str]:
    """Quote free-text values (prompts) for Hydra, so ``prompt="def main("`` works as typed.

    The shell strips the user's quotes and Hydra's override grammar rejects ``(``, ``,``, ``[``
    and more in a bare value. A value already in Hydra quotes (``'prompt="x"'``) is left alone.
    """
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") in keys and not _hydra_quoted(value):
            # Hydra unescapes only backslashes before a quote or at the end, and escaped quotes.
            value = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value)
            value = value.replace("'", "\\'")
            arg = f"{key}='{value}'"
        out.append(arg)
    return out


def _hydra_quoted(value: str) -> bool:
    return len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""
