"""Text tables: the one value formatter and the one table renderer (markdown or fixed-width
columns) behind every table the project prints or publishes: the bucket x metric comparisons of the
CLI and the report artifacts, the model list, the neighbour list, the tuning trials and the
long-tail results. Pure: strings in, strings out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

__all__ = ["MISSING", "bucket_columns", "bucket_pairs", "columns", "fmt", "markdown"]

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


def bucket_columns(metrics: Mapping[str, float], before: Mapping[str, float], before_label: str) -> tuple[list[str], list[list[str]]]:
    """A reviewer's table of ``"<bucket>/<metric>"`` values: ``(head, rows)`` with one column per
    bucket (GROUPS order) and, per metric (glossary order), a row ``"name ↑"`` (↓ where lower is
    better) whose cells are ``value (delta)`` against ``before``, then, when ``before`` has any of
    its values, a row ``"↳ <before_label>"`` with those. Render with ``markdown`` or ``columns``."""
    from pogdiff.glossary import GROUPS, lower_is_better

    pairs = bucket_pairs(metrics, before)
    buckets = [b for b in GROUPS if any(p[0] == b for p in pairs)]
    cells = {(bucket, name): (value, old) for bucket, name, value, old in pairs}
    rows = []
    for name in dict.fromkeys(p[1] for p in pairs):
        got = [cells.get((b, name), (None, None)) for b in buckets]
        rows.append([f"{name} {'↓' if lower_is_better(name) else '↑'}",
                     *(fmt(v) if old is None or v is None else f"{fmt(v)} ({fmt(v - old, '+.3f')})" for v, old in got)])
        if any(old is not None for _, old in got):
            rows.append([f"↳ {before_label}", *(fmt(old) for _, old in got)])
    return ["metric", *buckets], rows
