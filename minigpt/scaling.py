"""Scaling-law fits for a sweep over model size: ``L(N) = E + A·N^(-α)`` against non-embedding
parameters, ``L(C)`` against training compute ``C = 6·N·D``, and, for an isoFLOP grid, the
loss-optimal size at each compute budget.

The fits are read off completed jobs only (a final val loss), and refuse rather than guess: a
fit with fewer than :data:`MIN_POINTS` points, one that does not converge, or one whose loss
does not fall says why in a :class:`FitError`, and the report prints that instead of a line.
:mod:`minigpt.report` writes the section, :mod:`minigpt.plots` draws the curves.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from minigpt.jobs import Job

# E, A and α are three parameters: four points leave one degree of freedom, the least that
# gives the fit a residual, hence a covariance and standard errors at all.
MIN_POINTS = 4
ALPHA_MAX = 3.0  # no loss curve falls faster than N^-3; α at this bound means no power law
SAME_BUDGET = 1.1  # jobs within 10% of each other's compute are one isoFLOP budget
MIN_SIZES_PER_BUDGET = 3  # a parabola in log N through each budget needs three sizes
EXTRAPOLATE = 10.0  # how far past the largest point the curve is carried: one decade


class FitError(ValueError):
    """Why a fit was not made; the report prints it where the fitted values would be."""


@dataclass(frozen=True)
class Point:
    """What one completed job adds to a scaling fit."""

    label: str
    n: int  # non-embedding parameters
    tokens: int  # tokens seen in training
    loss: float  # final val loss

    @property
    def compute(self) -> float:
        """Training FLOPs, ``6·N·D``: a multiply-add per weight per token, forward and back."""
        return 6.0 * self.n * self.tokens


@dataclass(frozen=True)
class PowerLaw:
    """``L(x) = E + A·x^(-α)``, fitted with ``x`` scaled by ``x0`` (the points' geometric mean)
    so that A stays of order one for the optimizer; ``cov`` is over (E, A at x0, α)."""

    e: float
    a0: float  # A·x0^(-α): the reducible loss at x0
    alpha: float
    cov: tuple[tuple[float, ...], ...]
    x0: float
    x_min: float
    x_max: float
    points: int
    note: str = ""  # a parameter that ended on its bound, said under the fitted values

    @property
    def a(self) -> float:
        """A in the units of x (``L = E + A·x^(-α)``)."""
        return self.a0 * self.x0**self.alpha

    def stderr(self) -> tuple[float, float, float]:
        """Standard errors of E, A and α (A's by the delta method through the rescaling)."""
        cov = np.array(self.cov)
        log_x0 = math.log(self.x0)
        grad_a = np.array([0.0, self.x0**self.alpha, self.a * log_x0])
        return (
            math.sqrt(cov[0, 0]),
            math.sqrt(max(float(grad_a @ cov @ grad_a), 0.0)),
            math.sqrt(cov[2, 2]),
        )

    def __call__(self, x: Any) -> Any:
        return self.e + self.a0 * (np.asarray(x, dtype=float) / self.x0) ** -self.alpha

    def predict_stderr(self, x: float) -> float:
        """One standard error of ``L(x)`` from the parameters' covariance (delta method)."""
        u = x / self.x0
        grad = np.array([1.0, u**-self.alpha, -self.a0 * u**-self.alpha * math.log(u)])
        return math.sqrt(max(float(grad @ np.array(self.cov) @ grad), 0.0))


def fit_power_law(xs: list[float], losses: list[float], what: str = "N") -> PowerLaw:
    """Least-squares ``L = E + A·x^(-α)`` with 0 <= E <= min(L), A >= 0, 0 <= α <= 3.

    Raises :class:`FitError` with fewer than :data:`MIN_POINTS` distinct x, when no start
    converges, when the covariance is not finite, or when α runs to a bound (the loss does not
    fall with x, or falls off a cliff no power law makes).
    """
    from scipy.optimize import OptimizeWarning, curve_fit

    pairs = [(x, y) for x, y in zip(xs, losses, strict=True) if x > 0 and math.isfinite(y)]
    distinct = len({x for x, _ in pairs})
    if distinct < MIN_POINTS:
        raise FitError(
            f"{distinct} distinct {what} value(s); fitting E, A and α with an uncertainty needs "
            f"at least {MIN_POINTS}"
        )
    x = np.array([p for p, _ in pairs], dtype=float)
    y = np.array([v for _, v in pairs], dtype=float)
    x0 = float(np.exp(np.log(x).mean()))
    u = x / x0

    def law(u: np.ndarray, e: float, a0: float, alpha: float) -> np.ndarray:
        return e + a0 * u**-alpha

    best: tuple[float, np.ndarray, np.ndarray] | None = None
    bounds = ([0.0, 0.0, 0.0], [float(y.min()), np.inf, ALPHA_MAX])
    for alpha0 in (0.1, 0.3, 1.0):  # a few starts: E and α trade off along a shallow valley
        for e_frac in (0.0, 0.5, 0.9):
            e0 = e_frac * float(y.min())
            start = [e0, max(float(y.mean()) - e0, 1e-6), alpha0]
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", OptimizeWarning)
                    params, cov = curve_fit(law, u, y, p0=start, bounds=bounds, maxfev=5000)
            except (RuntimeError, ValueError):
                continue
            sse = float(((law(u, *params) - y) ** 2).sum())
            if best is None or sse < best[0]:
                best = (sse, params, cov)
    if best is None:
        raise FitError(f"the fit of L({what}) did not converge from any start")
    _, (e, a0, alpha), cov = best
    if alpha < 1e-3 or a0 < 1e-9:
        raise FitError(f"the loss does not fall as {what} grows: no power law to fit")
    if alpha > ALPHA_MAX * 0.999:
        raise FitError(f"α ran to its bound {ALPHA_MAX:g}: the points follow no power law")
    if not np.all(np.isfinite(cov)):
        raise FitError(f"the fit of L({what}) did not converge to determined values")
    rows = tuple(tuple(float(v) for v in row) for row in cov)
    note = ""
    if e < 1e-6 * float(y.min()):
        alpha_pure, alpha_pure_se = pure_power_law(x, y)
        note = (
            "E ended on its bound 0: the points do not yet level off, so E and α trade off "
            "against each other and are loosely determined. With E fixed at 0 (Kaplan's "
            f"L = ({what}_c/{what})^α, a straight line on log-log axes): α = {alpha_pure:.4g} "
            f"± {alpha_pure_se:.2g}."
        )
    elif e > 0.999 * float(y.min()):
        note = "E ended on its bound, the lowest loss measured: the loss has stopped falling."
    x_range = (x0, float(x.min()), float(x.max()))
    return PowerLaw(float(e), float(a0), float(alpha), rows, *x_range, len(pairs), note)


def pure_power_law(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """α and its standard error for ``L = A·x^(-α)``: a least-squares line of log L on log x.

    What a ladder that has not levelled off can tell: the full law's E and α are then
    degenerate, the slope is not.
    """
    (slope, _), cov = np.polyfit(np.log(x), np.log(y), 1, cov=True)
    return float(-slope), math.sqrt(max(float(cov[0, 0]), 0.0))


# ---------------------------------------------------------------- reading the jobs
def non_embedding_params(info: dict[str, Any]) -> int | None:
    """Parameters outside the token and position embeddings (Kaplan et al.'s N), from run.json.

    run.json's ``params_non_embedding`` leaves out only the position table (nanoGPT's count,
    where the tied token table is also the output layer); a scaling law leaves out both.
    """
    config = info.get("config")
    model = config.get("model") if isinstance(config, dict) else None
    data = info.get("data") if isinstance(info.get("data"), dict) else {}
    if not isinstance(model, dict):
        return None
    d, block = model.get("d_model"), model.get("block_size")
    vocab = model.get("vocab_size") or data.get("vocab_size")
    if not all(isinstance(v, int) for v in (d, vocab)):
        return None
    if isinstance(info.get("params_non_embedding"), int):
        n = info["params_non_embedding"] - vocab * d
    elif isinstance(info.get("params"), int) and isinstance(block, int):
        n = info["params"] - (vocab + block) * d
    else:
        return None
    return n if n > 0 else None


def points(jobs: list[Job]) -> list[Point]:
    """Every completed job that says its size, tokens seen and final val loss."""
    found = []
    for job in jobs:
        n, tokens = non_embedding_params(job.info), job.info.get("tokens_seen")
        loss = job.final_val_loss
        if n and isinstance(tokens, int) and tokens > 0 and loss is not None:
            found.append(Point(job.label, n, tokens, float(loss)))
    return found


# ---------------------------------------------------------------- isoFLOP budgets
@dataclass(frozen=True)
class Budget:
    """The jobs of one compute budget (within :data:`SAME_BUDGET` of each other) and the
    loss-optimal size among them."""

    compute: float  # the members' geometric mean
    points: tuple[Point, ...]
    n_opt: float | None  # the vertex of a parabola in log N; None when it is not inside
    loss_opt: float
    note: str  # how n_opt was found, or why it was not

    @property
    def best(self) -> Point:
        return min(self.points, key=lambda p: p.loss)

    @property
    def tokens_per_param(self) -> float | None:
        """``D/N`` at the optimum, with ``D = C / (6·N)``."""
        return self.compute / (6 * self.n_opt) / self.n_opt if self.n_opt else None


def budgets(found: list[Point]) -> list[Budget]:
    """Group the points by compute (sorted, a new budget beyond 10% of the first one's)."""
    groups: list[list[Point]] = []
    for point in sorted(found, key=lambda p: p.compute):
        if groups and point.compute <= groups[-1][0].compute * SAME_BUDGET:
            groups[-1].append(point)
        else:
            groups.append([point])
    return [_budget(group) for group in groups]


def _budget(group: list[Point]) -> Budget:
    compute = float(np.exp(np.mean([math.log(p.compute) for p in group])))
    best = min(group, key=lambda p: p.loss)
    sizes = sorted({p.n for p in group})
    if len(sizes) < MIN_SIZES_PER_BUDGET:
        return Budget(compute, tuple(group), None, best.loss, f"{len(sizes)} size(s)")
    log_n = np.log([p.n for p in group])
    c2, c1, c0 = np.polyfit(log_n, [p.loss for p in group], 2)
    vertex = -c1 / (2 * c2) if c2 > 0 else math.nan
    if not log_n.min() < vertex < log_n.max():
        edge = "smallest" if best.n == sizes[0] else "largest" if best.n == sizes[-1] else ""
        why = f"lowest loss at the {edge} size: " if edge else ""
        return Budget(compute, tuple(group), None, best.loss, why + "optimum outside the sizes")
    loss = float(c0 + c1 * vertex + c2 * vertex**2)
    return Budget(compute, tuple(group), float(math.exp(vertex)), loss, "parabola in log N")


def isoflop_budgets(found: list[Point]) -> list[Budget]:
    """The budgets of an isoFLOP sweep: two or more, each with three sizes or more.

    Raises :class:`FitError` when the jobs vary size and tokens but do not form such budgets.
    """
    grouped = [b for b in budgets(found) if len({p.n for p in b.points}) >= MIN_SIZES_PER_BUDGET]
    if len(grouped) < 2:
        raise FitError(
            f"{len(grouped)} compute budget(s) with {MIN_SIZES_PER_BUDGET}+ sizes (jobs within "
            f"{SAME_BUDGET - 1:.0%} of each other's 6·N·D); an isoFLOP analysis needs 2"
        )
    return grouped


def varies_size_and_tokens(found: list[Point]) -> bool:
    """Whether the jobs differ both in size and in tokens seen (an isoFLOP grid, perhaps)."""
    return len({p.n for p in found}) > 1 and len({p.tokens for p in found}) > 1


# ---------------------------------------------------------------- the analysis and its text
@dataclass(frozen=True)
class Analysis:
    """Every fit a size sweep allows, or why each was not made."""

    points: list[Point]
    by_params: PowerLaw | FitError
    by_compute: PowerLaw | FitError
    frontier: list[Budget]  # what L(C) is fitted to: every budget, at its lowest loss
    isoflop: list[Budget] | FitError | None  # None: the jobs do not vary both size and tokens


def analyse(found: list[Point]) -> Analysis:
    """Fit L(N) (when every job saw the same tokens), L(C) over every budget's lowest loss (a
    size ladder's every job; an isoFLOP grid's optima), and the isoFLOP optima (when the jobs
    vary both size and tokens)."""
    tokens = {p.tokens for p in found}
    by_params: PowerLaw | FitError
    if len(tokens) > 1:
        by_params = FitError(
            f"the jobs saw different numbers of tokens ({min(tokens):,} to {max(tokens):,}), so "
            "loss against N alone mixes size with data; see L(C)"
        )
    else:
        by_params = _try(lambda: fit_power_law([p.n for p in found], [p.loss for p in found]))
    isoflop: list[Budget] | FitError | None = None
    if varies_size_and_tokens(found):
        isoflop = _try(lambda: isoflop_budgets(found))
    frontier = budgets(found)  # each budget's lowest loss; an isoFLOP one's at its vertex
    by_compute = _try(
        lambda: fit_power_law([b.compute for b in frontier], [b.loss_opt for b in frontier], "C")
    )
    return Analysis(found, by_params, by_compute, frontier, isoflop)


def _try(make: Any) -> Any:
    try:
        return make()
    except FitError as err:
        return err


def markdown(analysis: Analysis, figures: dict[str, str]) -> list[str]:
    """report.md's scaling section; ``figures`` names the PNG drawn for "N", "C" and "isoflop"."""
    lines = [
        "## Scaling-law fits",
        "",
        "N counts non-embedding parameters (the token and position tables left out), D the "
        "tokens a job trained on, C = 6·N·D its training FLOPs; completed jobs only. ± is one "
        f"standard error from the fit's covariance, so a fit needs {MIN_POINTS} distinct points "
        "or more. The dashed curve past the largest point is an extrapolation, not a measurement.",
        "",
    ]
    lines += _law_lines("L(N)", "N", analysis.by_params, figures.get("N"))
    same_tokens = len({p.tokens for p in analysis.points}) == 1
    repeats = (
        "Every job saw the same tokens, so C = 6·D·N is proportional to N and L(C) repeats "
        "L(N) (the same E and α); an isoFLOP sweep varies D too."
    )
    extra = (repeats,) if same_tokens else ()
    lines += _law_lines("L(C)", "C", analysis.by_compute, figures.get("C"), extra)
    if isinstance(analysis.isoflop, FitError):
        lines += ["### IsoFLOP", "", f"No isoFLOP optima: {analysis.isoflop}.", ""]
    elif analysis.isoflop:
        lines += _isoflop_lines(analysis.isoflop, figures.get("isoflop"))
    return lines


def _law_lines(
    name: str, x: str, fit: PowerLaw | FitError, figure: str | None, extra: tuple[str, ...] = ()
) -> list[str]:
    title = f"### {name} = E + A·{x}^(-α)"
    if isinstance(fit, FitError):
        return [title, "", f"No fit of {name}: {fit}.", ""]
    e_se, a_se, alpha_se = fit.stderr()
    far = fit.x_max * EXTRAPOLATE
    lines = [
        title,
        "",
        "| parameter | value | ± s.e. |",
        "| --- | --- | --- |",
        f"| E | {fit.e:.4g} | {e_se:.2g} |" if fit.e > 1e-6 else f"| E | 0 | {e_se:.2g} |",
        f"| A | {fit.a:.4g} | {a_se:.2g} |",
        f"| α | {fit.alpha:.4g} | {alpha_se:.2g} |",
        "",
        f"Fitted to {fit.points} points, {x} from {fit.x_min:.3g} to {fit.x_max:.3g}. "
        f"Extrapolated one decade out (not measured): {name.replace(x, f'{far:.3g}')} = "
        f"{float(fit(far)):.4f} ± {fit.predict_stderr(far):.2g}.",
        "",
    ]
    for note in [fit.note, *extra]:
        lines += [note, ""] if note else []
    return lines + ([f"![{figure.removesuffix('.png')}]({figure})", ""] if figure else [])


def _isoflop_lines(found: list[Budget], figure: str | None) -> list[str]:
    lines = [
        "### IsoFLOP: the loss-optimal size per compute budget",
        "",
        "Jobs within 10% of each other's C are one budget; N_opt is the vertex of a parabola of "
        "loss in log N through its sizes, D_opt = C / (6·N_opt).",
        "",
        "| budget C (FLOPs) | sizes | best job (N, loss) | N_opt | D_opt | tokens per parameter "
        "| loss at N_opt |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for b in found:
        best = f"{b.best.label} ({b.best.n:,}, {b.best.loss:.4f})"
        if b.n_opt is None:
            row = [f"{b.compute:.3g}", str(len(b.points)), best, f"— ({b.note})", "—", "—", "—"]
        else:
            d_opt = b.compute / (6 * b.n_opt)
            ratio = f"{b.tokens_per_param:.3g}"
            row = [f"{b.compute:.3g}", str(len(b.points)), best, f"{b.n_opt:,.0f}", f"{d_opt:,.0f}"]
            row += [ratio, f"{b.loss_opt:.4f}"]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    return lines + ([f"![{figure.removesuffix('.png')}]({figure})", ""] if figure else [])
