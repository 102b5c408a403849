"""Hydra's sweep syntax read as an Optuna search space, and trial values written back as overrides.

The mapping is the one hydra-optuna-sweeper documents, so its users type the same thing:

- ``a,b,c`` or ``choice(a, b, c)``: one of the values (categorical);
- ``interval(low, high)``: a float in [low, high]; ``tag(log, interval(low, high))``: the same on
  a log scale (learning rates);
- ``range(start, stop, step)``: the values Hydra's ``range`` lists (``stop`` excluded, as in
  Python), as an int (or a stepped float) that TPE can order;
- anything else (``model=tiny``, ``+sweep=search_lr``): a fixed override given to every trial.

Hydra's plugin scan imports this module at every start of train.py; Optuna only loads in a search.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep, Override, RangeSweep
from hydra.errors import HydraException

# Optuna is imported inside the functions: Hydra's plugin scan imports every module of
# hydra_plugins at each start of train.py (0.5 s for optuna), also where it is not installed.
Distribution = Any  # optuna.distributions.BaseDistribution


@dataclass
class SearchSpace:
    """What every trial of a search gets: searched keys (distributions) and fixed overrides."""

    distributions: dict[str, Distribution] = field(default_factory=dict)
    fixed: list[str] = field(default_factory=list)

    def overrides(self, params: Mapping[str, Any]) -> list[str]:
        """The overrides of one trial: the fixed ones, then its value of every searched key."""
        return [*self.fixed, *(f"{key}={_text(params[key])}" for key in self.distributions)]

    def as_json(self) -> dict[str, str]:
        """The space as stored with the study, to refuse a resume under another space."""
        from optuna.distributions import distribution_to_json

        return {key: distribution_to_json(d) for key, d in sorted(self.distributions.items())}


def resolve(lines: list[str]) -> tuple[dict[str, Override], dict[str, str]]:
    """``hydra.sweeper.params`` then the command line, later keys winning: the sweeps (searched
    keys) and the fixed overrides. No optuna: the sweep report reads a search's space with it."""
    sweeps: dict[str, Override] = {}
    fixed: dict[str, str] = {}
    for override in OverridesParser.create().parse_overrides(lines):
        key = override.get_key_element()
        sweeps.pop(key, None)
        fixed.pop(key, None)
        if override.is_sweep_override():
            sweeps[key] = override
        else:
            fixed[key] = f"{key}={override.get_value_element_as_str()}"
    return sweeps, fixed


def is_log(override: Override) -> bool:
    """Whether a searched key's scale is logarithmic: ``tag(log, ...)``."""
    return "log" in getattr(override.value(), "tags", set())


def parse(lines: list[str]) -> SearchSpace:
    """The search space of ``hydra.sweeper.params`` then the command line (later keys win)."""
    sweeps, fixed = resolve(lines)
    space = SearchSpace(
        distributions={key: _distribution(o) for key, o in sweeps.items()},
        fixed=list(fixed.values()),
    )
    if not space.distributions:
        raise HydraException(
            "the search has nothing to search: give hydra.sweeper.params (see "
            "sweeps/search_lr.yaml) or a sweep on the command line, e.g. "
            "'optimizer.lr=tag(log, interval(1e-4, 1e-2))'"
        )
    return space


def describe(distribution: Distribution) -> str:
    """One distribution in words, for the dry run and the start line of a search."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(distribution, CategoricalDistribution):
        return "one of " + ", ".join(str(c) for c in distribution.choices)
    kind = "int" if isinstance(distribution, IntDistribution) else "float"
    scale = "log-uniform " if distribution.log else ""
    step = f", step {distribution.step}" if distribution.step not in (None, 1) else ""
    return f"{scale}{kind} in [{distribution.low:g}, {distribution.high:g}]{step}"


def _distribution(override: Override) -> Distribution:
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    value, log = override.value(), is_log(override)
    try:
        if isinstance(value, IntervalSweep):
            assert value.start is not None and value.end is not None
            return FloatDistribution(float(value.start), float(value.end), log=log)
        if isinstance(value, RangeSweep):
            if log:
                raise ValueError("a log scale needs an interval: tag(log, interval(low, high))")
            return _range(value, list(override.sweep_iterator()))
        if log:
            raise ValueError("a log scale needs an interval: tag(log, interval(low, high))")
        return CategoricalDistribution(list(override.sweep_string_iterator()))
    except ValueError as err:
        raise HydraException(f"{override.input_line}: {err}") from None


def _range(value: RangeSweep, items: list[Any]) -> Distribution:
    """Hydra's ``range`` as Optuna's stepped distribution over exactly the values it lists."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if not items:
        raise ValueError("the range lists no value")
    if value.shuffle:
        return CategoricalDistribution([str(i) for i in items])
    step = value.step if value.step is not None else 1
    low, high = min(items), max(items)
    if all(isinstance(i, int) for i in items) and isinstance(step, int):
        return IntDistribution(int(low), int(high), step=abs(step))
    return FloatDistribution(float(low), float(high), step=abs(float(step)))


def _text(value: Any) -> str:
    """A trial's value as Hydra override text (categorical values already are)."""
    if isinstance(value, bool):
        return str(value).lower()
    return value if isinstance(value, str) else repr(value)
