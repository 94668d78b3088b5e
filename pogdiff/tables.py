"""Text tables: the one value formatter and the one table renderer (markdown or fixed-width
columns) behind every table the project prints or publishes: the bucket x metric comparisons of the
CLI and the report artifacts, the model list, the neighbour list, the tuning trials and the
long-tail results. Pure: strings in, strings out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

__all__ = ["MISSING", "bucket_pairs", "columns", "fmt", "markdown"]

MISSING = "—"  # an absent value (no metric, no alias, no reference run)


def fmt(value: float | None, spec: str = ".3f") -> str:
    """``value`` formatted with ``spec`` (``format(value, spec)``), or MISSING when it is None."""
    return MISSING if value is None else format(value, spec)


def markdown(head: Sequence[str], rows: Iterable[Sequence[str]], right: Sequence[bool] | None = None) -> list[str]:
    """Lines of a markdown table: the header, its rule (column i right-aligned where ``right[i]``), the rows."""
    rule = "|" + "".join("---:|" if r else "---|" for r in (right or [False] * len(head)))
    return ["| " + " | ".join(head) + " |", rule, *("| " + " | ".join(row) + " |" for row in rows)]


def columns(rows: Iterable[Sequence[str]], widths: Sequence[int]) -> list[str]:
    """Lines of fixed-width text, one per row: cell i left-aligned in ``widths[i]`` characters when it is
    positive, right-aligned in ``-widths[i]`` when negative, as it is when 0 (no padding)."""
    return ["".join(format(cell, f"<{w}" if w >= 0 else f">{-w}") for cell, w in zip(row, widths)) for row in rows]


def bucket_pairs(metrics: Mapping[str, float], before: Mapping[str, float]) -> list[tuple[str, str, float, float | None]]:
    """``(bucket, metric, value, value before or None)`` for each ``"<bucket>/<metric>"`` of ``metrics``:
    buckets in GROUPS order (many, medium, few, overall), metrics in the glossary's order; other keys are left out."""
    from pogdiff.glossary import GROUPS, rank

    names = sorted({k.split("/", 1)[1] for k in metrics if "/" in k}, key=rank)
    return [(bucket, name, metrics[key], before.get(key))
            for bucket in GROUPS for name in names if (key := f"{bucket}/{name}") in metrics]
