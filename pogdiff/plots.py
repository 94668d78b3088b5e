"""Pictures of an evaluation: metric per bucket as bars, per-individual gRecall against training count.

Pure: figures are built on matplotlib's Agg canvas directly (no pyplot, no global backend or
figure state), so this works in worker threads and on machines without a display.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pogdiff.atomic import write_atomic
from pogdiff.glossary import lower_is_better
from pogdiff.metrics import BUCKETS, GROUPS, metric_names

if TYPE_CHECKING:
    from matplotlib.figure import Figure

COLOURS = {"many": "#4c72b0", "medium": "#dd8452", "few": "#c44e52", "overall": "#8c8c8c"}


def _figure(width: float, height: float) -> Figure:
    # here, not at import: every process that imports the evaluation would pay ~0.5 s for matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def metric_bars(metrics: dict[str, float], title: str | None = None, columns: int = 3) -> Figure:
    """One panel per metric, one bar per bucket (many, medium, few, overall) that has a value.

    Panels wrap after ``columns`` per row, so the figure stays 3 inches a column wide (330 pixels a
    panel, under 1000 for the picture at ``save_png``'s 110 dpi) however many metrics there are:
    the MLflow artifact viewer shrinks a wider picture until it cannot be read.
    """
    names = metric_names(metrics)
    if not names:
        raise ValueError("metric_bars needs '<bucket>/<metric>' keys, got none")
    cols = min(columns, len(names))
    rows = -(-len(names) // cols)
    fig = _figure(3.0 * cols, 2.9 * rows + (0.3 if title else 0.0))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[len(names):]:
        ax.remove()
    for ax, name in zip(axes, names):
        groups = [g for g in GROUPS if f"{g}/{name}" in metrics]
        values = [metrics[f"{g}/{name}"] for g in groups]
        bars = ax.bar(groups, values, color=[COLOURS[g] for g in groups])
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_title(f"{name} ({'lower' if lower_is_better(name) else 'higher'} is better)", fontsize=10)
        ax.margins(y=0.15)
        ax.tick_params(labelsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def grecall_scatter(rows: list[dict], many_above: int | None = None, few_below: int | None = None) -> Figure:
    """Per-individual gRecall against its training count (log x), coloured by bucket.

    rows (``EvalResult.per_individual``) need ``count``, ``bucket`` and ``grecall`` (rows where it is
    None are skipped); where a row's ``grecall_norm`` differs from its ``grecall`` (N_i < |T_i|)
    it is drawn as a hollow marker above the filled one. The bucket thresholds, when given, are
    drawn as dashed lines.
    """
    rows = [r for r in rows if r.get("grecall") is not None]
    if not rows:
        raise ValueError("grecall_scatter needs at least one row with a gRecall value")
    fig = _figure(6.0, 4.0)
    ax = fig.subplots()
    for bucket in BUCKETS:
        sel = [r for r in rows if r["bucket"] == bucket]
        if sel:
            ax.scatter([r["count"] for r in sel], [r["grecall"] for r in sel], s=28,
                       color=COLOURS[bucket], label=f"{bucket} ({len(sel)})", edgecolors="white", linewidths=0.5)
    capped = [r for r in rows if r.get("grecall_norm") is not None and r["grecall_norm"] != r["grecall"]]
    if capped:
        ax.scatter([r["count"] for r in capped], [r["grecall_norm"] for r in capped], s=28, facecolors="none",
                   edgecolors=[COLOURS[r["bucket"]] for r in capped], linewidths=1.0,
                   label="normalised, N_i < |T_i|")
    if few_below is not None:
        ax.axvline(few_below - 0.5, color=COLOURS["few"], linestyle="--", linewidth=0.8)
    if many_above is not None:
        ax.axvline(many_above + 0.5, color=COLOURS["many"], linestyle="--", linewidth=0.8)
    ax.set_xscale("log")
    counts = np.array([r["count"] for r in rows], float)
    ax.set_xlim(max(counts.min() / 1.5, 0.5), counts.max() * 1.5)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("training images per individual (log)")
    ax.set_ylabel("gRecall")
    ax.set_title("gRecall per individual")
    ax.legend(title="bucket (individuals)", fontsize=8, title_fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def save_png(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` as PNG atomically (temp file in the same folder, then rename); returns the path."""
    return write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=dpi))


def tune_trials(reference_score: float, trials: list[tuple[int, float, float, bool]], title: str | None = None) -> Figure:
    """Trials of ``pogdiff tune``: score by trial number and by lam, feasible or not, beside the lam = 0 reference.

    trials: (number, lam, score, feasible) per finished trial.
    """
    fig = _figure(9.0, 3.4)
    by_trial, by_lam = fig.subplots(1, 2)
    for ax, x_of, label in ((by_trial, lambda t: t[0], "trial"), (by_lam, lambda t: t[1], "lam (log scale)")):
        for ok, marker, name in ((True, "o", "feasible"), (False, "x", "infeasible: many-bucket accuracy fell")):
            pts = [t for t in trials if t[3] == ok]
            if pts:
                ax.scatter([x_of(t) for t in pts], [t[2] for t in pts], marker=marker, color=COLOURS["few"] if ok else "#555555", label=name)
        ax.axhline(reference_score, color=COLOURS["overall"], linestyle="--", label="lam = 0 (plain fine-tuning)")
        ax.set_xlabel(label)
        ax.set_ylabel("score: (few gRecall + few accuracy) / 2")
    by_lam.set_xscale("log")
    by_trial.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
