"""The sweep report's figures: losses against steps and tokens, the learning rate, the final
val loss against each swept number (and against model size), and the scaling-law fits. Each
function draws one PNG into ``out`` and returns its path, or None when the jobs hold nothing for
it to show."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from minigpt.jobs import Job, as_number
from minigpt.scaling import EXTRAPOLATE, Budget, PowerLaw

LOSS_VS_STEP = "loss_vs_step.png"
LOSS_VS_TOKENS = "loss_vs_tokens.png"
LR_VS_STEP = "lr_vs_step.png"
VAL_LOSS_VS_PARAMS = "val_loss_vs_params.png"
_STYLE = {
    "completed": "-",
    "running": "--",
    "pending": "--",
    "interrupted": "--",
    "failed": ":",
    "dead": ":",
}


def plot_losses(
    jobs: list[Job], out: Path, x: str, tokens_per_step: float | None = None
) -> Path | None:
    """Train and val loss of every job on shared axes, against ``x`` = "step" or "tokens".

    With ``tokens_per_step`` (every job's), the step axes count tokens along their top too.
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    drawn = [j for j in jobs if j.series("train/loss")[0] or j.series("val/loss")[0]]
    if not drawn:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharex=True, sharey=True)
    for i, job in enumerate(drawn):
        color = plt.get_cmap("tab10")(i % 10)
        style = _STYLE.get(job.status, "-")
        for ax, key in zip(axes, ("train/loss", "val/loss"), strict=True):
            steps, values = job.series(key)
            xs = _x_values(job, steps, x)
            if xs is None or not values:
                continue
            marker = "o" if key == "val/loss" else None
            ax.plot(xs, values, style, color=color, marker=marker, ms=3, lw=1.5, label=job.legend)
            if job.status == "failed":
                ax.plot(xs[-1], values[-1], "x", color=color, ms=9, mew=2)
    for ax, title in zip(axes, ("train loss", "val loss"), strict=True):
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.set_xlabel("optimizer step" if x == "step" else "tokens seen")
        if x == "tokens":
            ax.xaxis.set_major_formatter(EngFormatter())
        elif tokens_per_step:
            n = tokens_per_step
            top = ax.secondary_xaxis("top", functions=(lambda s, n=n: s * n, lambda t, n=n: t / n))
            top.xaxis.set_major_formatter(EngFormatter())
            top.set_xlabel("tokens seen")
    _log_y(axes[0])  # the y axis is shared
    axes[0].set_ylabel("loss (nats/token, log scale)")
    _legend_below(fig, axes[0])
    return _save(fig, out / (LOSS_VS_STEP if x == "step" else LOSS_VS_TOKENS))


def _save(fig: Any, path: Path) -> Path:
    """Write the figure and free it (pyplot keeps every open figure alive otherwise)."""
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _log_y(ax: Any) -> None:
    """A log loss axis with a few ticks labelled as plain numbers (2.5, 3, 4 rather than 2.5e0).

    Call it after plotting: the ticks are chosen within the data's range.
    """
    from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

    ax.set_yscale("log")
    low, high = ax.get_ylim()
    ticks: list[float] = []
    for mantissas in ((1, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 9), (1, 2, 3, 5), (1, 3), (1,)):
        ticks = [
            m * 10.0**e
            for e in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
            for m in mantissas
            if low <= m * 10.0**e <= high
        ]
        if len(ticks) <= 8:
            break
    if len(ticks) < 3:  # a narrow range, within one step of the ladder: evenly spaced instead
        ticks = [t for t in MaxNLocator(5).tick_values(low, high) if low <= t <= high]
    ax.set_yticks(ticks)
    # The fewest decimals that keep every label distinct (2.65, 2.655 and 2.66 need three).
    places = next((d for d in range(7) if len({f"{t:.{d}f}" for t in ticks}) == len(ticks)), 6)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.{places}f}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="major", alpha=0.3)


def _x_values(job: Job, steps: list[int], x: str) -> list[float] | None:
    if x == "step":
        return [float(s) for s in steps]
    per_step = job.tokens_per_step
    return [s * per_step for s in steps] if per_step else None


def _legend_below(fig: Any, ax: Any) -> None:
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ncol = 1 if max(map(len, unique), default=0) > 40 else min(3, len(unique))
    fig.legend(
        unique.values(), unique.keys(), loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=ncol
    )
    fig.tight_layout()


def plot_val_loss_vs_params(jobs: list[Job], out: Path) -> Path | None:
    """Final val loss against parameter count, log-log, when the completed jobs differ in size."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter, NullFormatter

    points = [(j.params, j.final_val_loss, j) for j in jobs if j.params and j.final_val_loss]
    if len({p for p, _, _ in points}) < 2:
        return None
    points.sort(key=lambda p: p[0])
    fig, ax = plt.subplots(figsize=(7, 5))
    best: dict[int, float] = {}
    for params, loss, _ in points:
        best[params] = min(loss, best.get(params, math.inf))
    ax.plot(list(best), list(best.values()), "-", color="0.6", lw=1, zorder=1)
    ax.scatter([p for p, _, _ in points], [v for _, v, _ in points], s=40, zorder=2)
    for params, loss, job in points:
        label = " ".join(job.shown) or job.label
        ax.annotate(label, (params, loss), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.set_xscale("log")
    ax.margins(x=0.15, y=0.1)
    _log_y(ax)
    # A tick at each model size: a sweep has a handful, and a decade often holds them all.
    ax.set_xticks(sorted(best), minor=False)
    ax.xaxis.set_major_formatter(EngFormatter(places=1))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("parameters")
    ax.set_ylabel("final val loss (log scale)")
    ax.set_title("Final validation loss vs model size (completed jobs)")
    return _save(fig, out / VAL_LOSS_VS_PARAMS)


def shared_tokens_per_step(jobs: list[Job]) -> float | None:
    """The tokens per step every job saw, when they all saw the same (loss vs tokens would then
    repeat loss vs step); None when they differ or no job says."""
    seen = {round(t, 6) for j in jobs if (t := j.tokens_per_step)}
    return seen.pop() if len(seen) == 1 else None


def plot_lr(jobs: list[Job], out: Path) -> Path | None:
    """The learning rate against step, one line per job that logged ``lr``.

    Drawn for every sweep (and single run) that logged it: a run stuck in warm-up, or a schedule
    that differs from the planned one, shows at a glance. Log scale when the peaks span 10x.
    """
    import matplotlib.pyplot as plt

    drawn = [j for j in jobs if j.series("lr")[0]]
    if not drawn:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for i, job in enumerate(drawn):
        steps, values = job.series("lr")
        color = plt.get_cmap("tab10")(i % 10)
        ax.plot(steps, values, _STYLE.get(job.status, "-"), color=color, lw=1.5, label=job.legend)
    peaks = [max(j.series("lr")[1]) for j in drawn]
    if min(peaks) > 0 and max(peaks) >= 10 * min(peaks):
        ax.set_yscale("log")
    same = len({tuple(zip(*j.series("lr"), strict=True)) for j in drawn}) == 1 and len(drawn) > 1
    ax.set_title("Learning rate vs step" + (" (every job's is the same)" if same else ""))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.grid(True, alpha=0.3)
    _legend_below(fig, ax)
    return _save(fig, out / LR_VS_STEP)


def swept_plot_name(key: str) -> str:
    """``val_loss_vs_optimizer_lr.png`` for ``optimizer.lr``."""
    return f"val_loss_vs_{re.sub(r'[^A-Za-z0-9_-]+', '_', key)}.png"


def plot_val_loss_vs_swept(
    jobs: list[Job], out: Path, key: str, values: dict[str, float]
) -> Path | None:
    """Final (filled) and best (hollow) val loss against the value of one swept key.

    Jobs that share the other swept keys' values are joined by a line, so a grid sweep shows one
    curve per setting of the rest. Log x when the values span 10x or more.
    """
    import matplotlib.pyplot as plt

    points = [(values[j.label], j) for j in jobs if j.label in values and j.best_val_loss]
    if len({x for x, _ in points}) < 2:
        return None
    fig, ax = plt.subplots(figsize=(7, 5))
    groups: dict[str, list[tuple[float, Job]]] = {}
    for x, job in sorted(points, key=lambda p: p[0]):
        rest = " ".join(o for o in job.shown if o.lstrip("+~").partition("=")[0] != key)
        groups.setdefault(rest, []).append((x, job))
    for i, (rest, group) in enumerate(groups.items()):
        color = plt.get_cmap("tab10")(i % 10)
        final = [(x, j.final_val_loss) for x, j in group if j.final_val_loss is not None]
        label = f"final, {rest}" if rest else "final val loss (completed jobs)"
        if final:
            ax.plot(*zip(*final, strict=True), "o-", color=color, ms=6, label=label)
        best = [(x, j.best_val_loss) for x, j in group]
        ax.plot(*zip(*best, strict=True), "o", mfc="none", color=color, ms=10, label="best")
    xs = [x for x, _ in points]
    if min(xs) > 0 and max(xs) >= 10 * min(xs):
        ax.set_xscale("log")
    from matplotlib.ticker import NullFormatter

    ax.set_xticks(sorted(set(xs)), [f"{x:g}" for x in sorted(set(xs))])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.1, y=0.1)
    _log_y(ax)
    ax.set_xlabel(key)
    ax.set_ylabel("val loss (log scale)")
    ax.set_title(f"Final and best validation loss vs {key}")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), fontsize=8)
    return _save(fig, out / swept_plot_name(key))


SCALING_VS_PARAMS = "scaling_loss_vs_params.png"
SCALING_VS_COMPUTE = "scaling_loss_vs_compute.png"
ISOFLOP = "isoflop.png"


def plot_power_law(
    xs: list[float],
    losses: list[float],
    fit: PowerLaw,
    out: Path,
    name: str,
    xlabel: str,
    label: str = "final val loss (completed jobs)",
) -> Path:
    """The points, the fitted law through them (±1 standard error shaded), and the law carried
    one decade past the largest point, dashed and labelled as an extrapolation. ``xlabel`` ends
    with the variable's symbol (N, C), which the legend's formula uses."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import EngFormatter, NullFormatter

    fig, ax = plt.subplots(figsize=(7, 5))
    ax.scatter(xs, losses, s=40, zorder=3, label=label)
    inside = np.geomspace(fit.x_min, fit.x_max, 100)
    beyond = np.geomspace(fit.x_max, fit.x_max * EXTRAPOLATE, 50)
    symbol = xlabel.split()[-1]  # "non-embedding parameters N" -> N
    e = f"{fit.e:.3g}" if fit.e > 1e-6 else "0"
    law = f"fit: L = {e} + {fit.a:.3g}·{symbol}^(-{fit.alpha:.3g})"
    ax.plot(inside, fit(inside), "-", color="C1", lw=1.5, label=law)
    ax.plot(beyond, fit(beyond), "--", color="C1", lw=1.5, label="extrapolation, one decade out")
    for span in (inside, beyond):
        band = np.array([fit.predict_stderr(x) for x in span])
        ax.fill_between(span, fit(span) - band, fit(span) + band, color="C1", alpha=0.15, lw=0)
    ax.axvline(fit.x_max, color="0.6", lw=0.8, ls=":")
    ax.annotate(
        " extrapolated (not measured) →",
        (fit.x_max, 0.02),
        xycoords=("data", "axes fraction"),
        fontsize=8,
        color="0.4",
    )
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(EngFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(y=0.1)
    _log_y(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("final val loss (log scale)")
    ax.set_title(f"Scaling fit: final val loss vs {xlabel} (shaded: ±1 s.e.)")
    ax.legend(fontsize=8)
    return _save(fig, out / name)


def plot_isoflop(budgets: list[Budget], out: Path) -> Path:
    """Loss against size at each compute budget, the parabola in log N through each, and the
    loss-optimal size marked (a star where the vertex lies among the sizes tried)."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import EngFormatter

    fig, ax = plt.subplots(figsize=(7, 5))
    for i, budget in enumerate(budgets):
        color = plt.get_cmap("viridis")(i / max(1, len(budgets) - 1))
        pts = sorted(budget.points, key=lambda p: p.n)
        ns, losses = [p.n for p in pts], [p.loss for p in pts]
        ax.plot(ns, losses, "o", color=color, label=f"C = {budget.compute:.2e} FLOPs")
        curve = np.polyfit(np.log(ns), losses, 2)
        span = np.geomspace(min(ns), max(ns), 100)
        ax.plot(span, np.polyval(curve, np.log(span)), "-", color=color, lw=1)
        if budget.n_opt is not None:
            ax.plot(budget.n_opt, budget.loss_opt, "*", color=color, ms=14, mec="k")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(EngFormatter())
    ax.xaxis.set_minor_formatter(EngFormatter())  # a budget's sizes often span less than 10x
    ax.margins(y=0.1)
    _log_y(ax)
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel("final val loss (log scale)")
    ax.set_title("IsoFLOP: loss vs size per compute budget (★ loss-optimal N)")
    ax.legend(fontsize=8)
    return _save(fig, out / ISOFLOP)


SEARCH_HISTORY = "search_history.png"


def plot_search_history(
    losses: dict[int, float], failed: list[int], maximize: bool, out: Path
) -> Path:
    """A search's final val loss against trial number, with the best so far as a step line
    and failed trials as × along the top: whether the search is still finding better trials."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    numbers = sorted(losses)
    pick = max if maximize else min
    best = [pick(losses[m] for m in numbers[: i + 1]) for i in range(len(numbers))]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(numbers, [losses[n] for n in numbers], "o", ms=6, label="trial (completed)")
    ax.step(numbers, best, where="post", color="C1", lw=1.5, label="best so far")
    if failed:  # no value to place: at the top, against the x axis only
        top = ax.get_xaxis_transform()
        ax.plot(
            failed, [0.97] * len(failed), "x", c="C3", ms=8, mew=2, transform=top, label="failed"
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.margins(x=0.05, y=0.1)
    _log_y(ax)
    ax.set_xlabel("trial")
    ax.set_ylabel("final val loss (log scale)")
    ax.set_title("Search: final validation loss over trials")
    ax.legend(fontsize=8)
    return _save(fig, out / SEARCH_HISTORY)


def search_plot_name(key: str) -> str:
    """``search_val_loss_vs_optimizer_lr.png`` for ``optimizer.lr``."""
    return "search_" + swept_plot_name(key)


def plot_search_param(
    key: str, points: list[tuple[str, float, int]], best: int, log: bool, out: Path
) -> Path | None:
    """Final val loss against one searched value (text, loss, trial number per point), coloured
    by trial number, trial ``best`` starred: where the sampler went and what it found. Log x
    where the space is log; values that are not all numbers (choices) are categories."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    if not points:
        return None
    numeric = all(as_number(text) is not None for text, _, _ in points)
    xs: list[Any] = [as_number(t) if numeric else t for t, _, _ in points]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    dots = ax.scatter(
        xs, [v for _, v, _ in points], c=[n for _, _, n in points], cmap="viridis", s=40
    )
    colorbar = fig.colorbar(dots, ax=ax, label="trial")
    colorbar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    for x, (_, loss, number) in zip(xs, points, strict=True):
        if number == best:
            ax.plot(x, loss, "*", color="C3", ms=16, mec="k", label=f"best (trial {best})")
    if log and numeric and min(xs) > 0:
        ax.set_xscale("log")  # ticks at 1, 2, 5 per decade, as plain numbers (0.002, not 2e-3)
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.1, y=0.1)
    _log_y(ax)
    ax.set_xlabel(key + (" (log scale)" if ax.get_xscale() == "log" else ""))
    ax.set_ylabel("final val loss (log scale)")
    ax.set_title(f"Search: final validation loss vs {key}")
    ax.legend(fontsize=8)
    return _save(fig, out / search_plot_name(key))
