"""``pogdiff compare A B``: two evaluated models side by side, bucket x metric, with deltas.

A and B are MLflow run ids or model references (``champion``, ``challenger``, ``name@alias``,
``name/version``), resolved in the store of the settings' tracking URI (storage/mlflow/references.py).
"""

from __future__ import annotations

import argparse
import json
import sys

from storage.config import RegisterConfig
from storage.links import redact_text
from storage.settings import Settings


def comparison_rows(a: dict[str, float], b: dict[str, float]) -> list[dict]:
    """One row per (group, metric) present in A or B: values, delta = B - A, and which side is better.

    ``better`` is ``"A"``, ``"B"``, ``"="`` or None (a side lacks the metric), by the metric's direction
    in ``pogdiff.glossary``.
    """
    from pogdiff.glossary import lower_is_better
    from pogdiff.metrics import GROUPS, metric_names

    rows = []
    for group in GROUPS:
        for name in metric_names({**a, **b}):
            key = f"{group}/{name}"
            va, vb = a.get(key), b.get(key)
            if va is None and vb is None:
                continue
            delta = None if va is None or vb is None else vb - va
            if delta is None:
                better = None
            elif delta == 0:
                better = "="
            else:
                better = "B" if (delta < 0) == lower_is_better(name) else "A"
            rows.append({"bucket": group, "metric": name, "a": va, "b": vb, "delta": delta, "better": better})
    return rows


def _side(r) -> dict:
    return {"ref": r.ref, "run_id": r.run_id, "model": r.model, "version": r.version}


def _label(r) -> str:
    return f"{r.model} v{r.version} (run {r.run_id})" if r.model else f"run {r.run_id}"


def cmd_compare(args, settings: Settings) -> int:
    from pogdiff.glossary import lower_is_better
    from pogdiff.tables import MISSING, columns, fmt
    from storage.errors import RunNotFound
    from storage.mlflow.references import resolve_run

    try:
        a = resolve_run(settings.mlflow_tracking_uri, args.a, args.model)
        b = resolve_run(settings.mlflow_tracking_uri, args.b, args.model)
    except RunNotFound as err:
        print(f"error: {redact_text(str(err))}", file=sys.stderr)
        return 2
    rows = comparison_rows(a.metrics, b.metrics)
    if args.json:
        print(json.dumps({"a": _side(a), "b": _side(b), "rows": rows}))
        return 0
    print(f"A: {args.a} = {_label(a)}")
    print(f"B: {args.b} = {_label(b)}")
    if not rows:
        print("neither run has evaluation metrics ('<bucket>/<metric>')")
        return 0
    head = ("bucket", "metric", "A", "B", "B - A", "  better")
    cells = [(r["bucket"], r["metric"], fmt(r["a"], ".4f"), fmt(r["b"], ".4f"), fmt(r["delta"], "+.4f"), f"  {r['better'] or MISSING}")
             for r in rows]
    print("\n" + "\n".join(columns([head, *cells], [9, 18, -10, -10, -10, 0])))
    lower = ", ".join(sorted({r["metric"] for r in rows if lower_is_better(r["metric"])}))
    print(f"\n({lower}: lower is better; every other metric: higher is better)" if lower else "\n(every metric here: higher is better)")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("compare", help="compare two evaluated models: bucket x metric table with deltas")
    c.add_argument("a", help="run id, alias (champion, challenger), name@alias or name/version")
    c.add_argument("b", help="the same kinds of reference; deltas are B - A")
    c.add_argument("--model", default=RegisterConfig().model_name,
                   help="registered model a bare alias refers to (default: %(default)s)")
    c.add_argument("--json", action="store_true", help="print the table as JSON")
    c.set_defaults(func=cmd_compare)
