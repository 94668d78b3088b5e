"""Two evaluated models on one self-contained HTML page: metric table with deltas, grids side by side.

Pure: values and PNG bytes in, one HTML string out. The page loads nothing: styles are inline and
the pictures are ``data:`` URIs, so it opens offline, from a ticket attachment or inside MLflow's
artifact viewer, and shows what it showed when it was written.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field

from pogdiff.glossary import BUCKETS, GROUPS, lower_is_better
from pogdiff.metrics import metric_names
from pogdiff.tables import MISSING, fmt


def direction(metric: str) -> str:
    """``"lower"`` or ``"higher"``: which way ``metric`` is better.

    The page and ``pogdiff compare`` read it from ``pogdiff.glossary``, where every metric's
    definition and direction live.
    """
    return "lower" if lower_is_better(metric) else "higher"


def comparison_rows(a: dict[str, float], b: dict[str, float]) -> list[dict]:
    """One row per (group, metric) present in A or B: values, delta = B - A, and which side is better.

    Rows in GROUPS then display order; ``better`` is ``"A"``, ``"B"``, ``"="`` or None (a side lacks
    the metric), by the metric's ``direction``. Keys that are not ``<group>/<metric>`` are left out.
    """
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
                better = "B" if (delta < 0) == (direction(name) == "lower") else "A"
            rows.append({"bucket": group, "metric": name, "a": va, "b": vb, "delta": delta, "better": better})
    return rows


@dataclass(frozen=True)
class Side:
    """One model of the comparison: how the page names it, a detail line (run id, snapshot), an
    optional link (its MLflow run), its ``<group>/<metric>`` values and its grids as PNG bytes by bucket."""

    label: str
    detail: str
    metrics: dict[str, float]
    grids: dict[str, bytes] = field(default_factory=dict)
    link: str | None = None


_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px; color: #111; }
h1 { font-size: 20px; } h2 { font-size: 17px; margin-top: 28px; } h3 { font-size: 15px; }
table { border-collapse: collapse; } th, td { padding: 3px 10px; border-bottom: 1px solid #ddd; }
th { text-align: left; background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.good { background: #e3f4e1; } td.bad { background: #fbe3e1; }
.sides { display: flex; gap: 16px; flex-wrap: wrap; align-items: flex-start; }
figure { flex: 0 1 auto; margin: 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-weight: 600; margin-bottom: 4px; } .muted { color: #666; }
"""


def _name(side: Side, letter: str) -> str:
    label = html.escape(side.label)
    if side.link:
        label = f'<a href="{html.escape(side.link)}">{label}</a>'
    return f"<b>{letter}</b>: {label} <span class=muted>({html.escape(side.detail)})</span>"


def _table(rows: list[dict]) -> list[str]:
    out = ["<table>", "<tr><th>bucket</th><th>metric</th><th>better when</th><th>A</th><th>B</th><th>B &minus; A</th><th>better</th></tr>"]
    for r in rows:
        good = {"B": "good", "A": "bad"}.get(r["better"] or "", "")
        out.append(f"<tr><td>{r['bucket']}</td><td>{html.escape(r['metric'])}</td><td>{direction(r['metric'])}</td>"
                   f"<td class=num>{fmt(r['a'], '.4f')}</td><td class=num>{fmt(r['b'], '.4f')}</td>"
                   f"<td class='num {good}'>{fmt(r['delta'], '+.4f')}</td><td>{r['better'] or MISSING}</td></tr>")
    out.append("</table>")
    return out


def _figure(side: Side, letter: str, bucket: str) -> str:
    png = side.grids.get(bucket)
    body = (f'<img alt="{letter}: grid_{bucket}.png" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
            if png else f"<p class=muted>no grid_{bucket}.png in this run</p>")
    return f"<figure><figcaption>{letter}: {html.escape(side.label)}</figcaption>{body}</figure>"


def render(title: str, a: Side, b: Side) -> str:
    """The page: title, the two sides, the bucket x metric table (A, B, B - A, which is better and
    which way each metric is better), then per bucket either side has a grid, A's and B's side by side
    where the window holds both at full size, else one above the other (a grid is never shrunk to
    half its width: its captions must stay readable)."""
    rows = comparison_rows(a.metrics, b.metrics)
    parts = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{_name(a, 'A')}<br>{_name(b, 'B')}</p>",
        "<h2>Metrics per bucket</h2>",
        *(_table(rows) if rows else ["<p>Neither side has evaluation metrics (<code>&lt;bucket&gt;/&lt;metric&gt;</code>).</p>"]),
        "<p class=muted>Deltas are B &minus; A; green where B is better by the metric's direction, red where A is.</p>",
        "<h2>Samples per bucket</h2>",
        "<p class=muted>Each grid pairs a real training image with the image the model generated from its caption.</p>",
    ]
    for bucket in BUCKETS:
        if bucket in a.grids or bucket in b.grids:
            parts += [f"<h3>{bucket} bucket</h3>", '<div class="sides">', _figure(a, "A", bucket), _figure(b, "B", bucket), "</div>"]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
