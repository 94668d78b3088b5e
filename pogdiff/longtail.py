"""The long-tail comparison's arithmetic: seed aggregation, the goal checks, the results tables, and
the diagnostics that say whether PoGDiff can borrow at all on a data set (psi per bucket, s_img
between caption pairs).

Metrics arrive as one ``{"<bucket>/<metric>": value}`` dict per (method, seed), as
``pogdiff.evaluation.evaluate`` returns them. Pure library code: no stores, no orchestration.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pogdiff.config import PoGConfig
from pogdiff.glossary import lower_is_better
from pogdiff.metrics import GROUPS, metric_names
from pogdiff.neighbours import NeighbourGraph, draw_borrowing, similarity_threshold
from pogdiff.tables import MISSING, markdown

Aggregate = dict[str, dict[str, dict[str, dict[str, float | list[float]]]]]  # method -> bucket -> metric -> stats


def aggregate(runs: dict[str, list[dict[str, float]]]) -> Aggregate:
    """method -> list over seeds of ``{"<bucket>/<metric>": v}`` -> method -> bucket -> metric ->
    ``{"mean", "std", "values"}``.

    std is the sample standard deviation over seeds (ddof = 1; 0 for a single seed). A metric that a
    seed left out (e.g. the Fréchet distance of a bucket with too few images) is aggregated over the seeds that have it;
    ``values`` holds only those.
    """
    out: Aggregate = {}
    for method, seeds in runs.items():
        keys = sorted({k for m in seeds for k in m})
        by_bucket: dict[str, dict[str, dict]] = {}
        for key in keys:
            bucket, metric = key.split("/", 1)
            values = [float(m[key]) for m in seeds if key in m]
            std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
            by_bucket.setdefault(bucket, {})[metric] = {"mean": float(np.mean(values)), "std": std, "values": values}
        out[method] = by_bucket
    return out


def _stat(agg: Aggregate, method: str, bucket: str, metric: str) -> dict | None:
    return agg.get(method, {}).get(bucket, {}).get(metric)


def no_harm_check(agg: Aggregate, method: str, baseline: str, buckets: tuple[str, ...], metrics: tuple[str, ...]) -> dict:
    """Not worse than ``baseline`` by more than one seed std on each bucket x metric:
    sign * (mean_m - mean_base) >= -max(std_m, std_base). Returns ``{"checks": [...], "met": bool}``;
    a missing value fails its check."""
    checks = []
    for bucket in buckets:
        for metric in metrics:
            m, b = _stat(agg, method, bucket, metric), _stat(agg, baseline, bucket, metric)
            row = {"bucket": bucket, "metric": metric, "baseline": baseline, "test": "not_worse"}
            if m is None or b is None:
                checks.append({**row, "passed": False, "note": "missing value"})
                continue
            diff = (-1.0 if lower_is_better(metric) else 1.0) * (m["mean"] - b["mean"])
            margin = max(m["std"], b["std"])
            checks.append({**row, "difference": diff, "margin": margin, "passed": bool(diff >= -margin)})
    return {"checks": checks, "met": all(c["passed"] for c in checks)}


def claim_check(
    agg: Aggregate,
    method: str,
    baseline: str,
    controls: tuple[str, ...],
    metrics: tuple[str, ...] = ("holdout_accuracy", "holdout_grecall"),
    copy_metric: str | None = "copy_rate",
    few: str = "few",
    many: str = "many",
    head_max_drop: float = 0.03,
) -> dict:
    """Does ``method`` beat ``baseline`` where it claims to, without paying for it elsewhere?

    gain:    mean_m - mean_b > max(std_m, std_b) on ``few`` for at least one of ``metrics``
    copy:    copy_m - copy_b <= max(std_m, std_b) on ``few``  (not more copying, beyond the seed noise)
    head:    acc_b - acc_m <= head_max_drop on ``many`` accuracy
    control: for each control c, mean_m - mean_c > max(std_m, std_c) on a metric where the gain held
             (the control does not match the method, so the neighbour is what helped)

    Returns ``{"checks": [...], "met": bool}``: every check passes; a missing value fails its check.
    """
    checks: list[dict] = []

    def diff(a: str, b: str, bucket: str, metric: str, what: str, test) -> dict:
        m, o = _stat(agg, a, bucket, metric), _stat(agg, b, bucket, metric)
        row = {"what": what, "method": a, "against": b, "bucket": bucket, "metric": metric}
        if m is None or o is None:
            return {**row, "passed": False, "note": "missing value"}
        d, margin = m["mean"] - o["mean"], max(m["std"], o["std"])
        return {**row, "difference": d, "margin": margin, "passed": bool(test(d, margin))}

    gains = [diff(method, baseline, few, name, f"gain {few}/{name}", lambda d, m: d > m) for name in metrics]
    won = [g["metric"] for g in gains if g["passed"]]
    checks.append({**_best(gains), "what": "gain", "passed": bool(won), "parts": gains})
    if copy_metric is not None:
        checks.append(diff(method, baseline, few, copy_metric, f"copy {few}/{copy_metric}", lambda d, m: d <= m))
    checks.append(diff(method, baseline, many, "accuracy", f"head {many}/accuracy", lambda d, m: d >= -head_max_drop))
    for control in controls:
        parts = [diff(method, control, few, name, f"{control} below on {few}/{name}", lambda d, m: d > m) for name in won or metrics]
        checks.append({**_best(parts), "what": f"control {control}", "passed": any(p["passed"] for p in parts), "parts": parts})
    return {"checks": checks, "met": all(c["passed"] for c in checks)}


def _best(parts: list[dict]) -> dict:
    """The part that came nearest to passing (its difference furthest above its margin); {} when none has values."""
    return max((p for p in parts if "difference" in p), key=lambda p: p["difference"] - p["margin"], default={})


def role_table(per_seed: dict[str, list[list[dict]]], role_of: dict[str, str], metrics: tuple[str, ...], bucket: str = "few",
               lower_better: frozenset[str] = frozenset()) -> str:
    """Markdown: per method and role (e.g. a families catalogue's colour variants, shape variants,
    controls), each metric's mean over the role's ``bucket`` individuals, then mean ± std over seeds.

    per_seed: method -> one list per seed of ``EvalResult.per_individual`` rows; role_of: individual
    name -> role. Roles appear in the order first met; individuals without a role are left out.
    ``lower_better``: metrics outside the glossary (a benchmark's diagnostics) where lower is better.
    """
    roles = list(dict.fromkeys(role_of[r["individual"]] for rows in per_seed.values() for seed in rows for r in seed
                               if r["bucket"] == bucket and r["individual"] in role_of))
    out = []
    for method, seeds in per_seed.items():
        for role in roles:
            cells = []
            for name in metrics:
                values = [float(np.mean(v)) for seed in seeds
                          if (v := [r[name] for r in seed if r["bucket"] == bucket and role_of.get(r["individual"]) == role
                                    and r.get(name) is not None])]
                cells.append(_cell({"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}
                                   if values else None))
            out.append([method, role, *cells])
    arrows = [f"{n} {'↓' if lower_is_better(n) or n in lower_better else '↑'}" for n in metrics]
    return "\n".join(markdown(["method", "role", *arrows], out)) + "\n"


def competence_check(agg: Aggregate, method: str = "vanilla") -> dict:
    """Is the fine-tuned model competent, with a visible long tail? (the embedded default's bar)

    many-bucket judge accuracy >= 0.90, overall >= 0.70, and few-bucket accuracy at least 0.15
    below many-bucket accuracy (means over seeds). A missing value fails its check.
    """
    acc = {b: agg.get(method, {}).get(b, {}).get("accuracy", {}).get("mean") for b in ("many", "few", "overall")}
    checks = [
        {"check": "many/accuracy >= 0.90", "value": acc["many"], "passed": acc["many"] is not None and acc["many"] >= 0.90},
        {"check": "overall/accuracy >= 0.70", "value": acc["overall"],
         "passed": acc["overall"] is not None and acc["overall"] >= 0.70},
        {"check": "many/accuracy - few/accuracy >= 0.15",
         "value": None if None in (acc["many"], acc["few"]) else acc["many"] - acc["few"],
         "passed": None not in (acc["many"], acc["few"]) and acc["many"] - acc["few"] >= 0.15},
    ]
    return {"method": method, "checks": checks, "met": all(c["passed"] for c in checks)}


def _cell(stat: dict | None) -> str:
    return MISSING if stat is None else f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def markdown_table(agg: Aggregate, metrics: tuple[str, ...] | None = None, groups: tuple[str, ...] = GROUPS) -> str:
    """One row per (method, metric), one column per bucket: ``mean ± std`` over seeds (``MISSING`` where absent).
    ``metrics``: the rows' metrics in order (default: every metric present, in the glossary's order)."""
    present = [g for g in groups if any(g in agg[m] for m in agg)]
    if metrics is None:
        metrics = tuple(metric_names({f"{g}/{n}": 0.0 for m in agg for g in present for n in agg[m].get(g, {})}))
    names = [n for n in metrics if any(n in agg[m].get(g, {}) for m in agg for g in present)]
    rows = [[method, f"{name} {'↓' if lower_is_better(name) else '↑'}", *(_cell(_stat(agg, method, g, name)) for g in present)]
            for method in agg for name in names]
    return "\n".join(markdown(["method", "metric", *present], rows)) + "\n"


def psi_by_bucket(
    graph: NeighbourGraph,
    buckets: list[str],
    pog: PoGConfig,
    num_train_timesteps: int,
    draws: int = 20_000,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """What psi the trainer would give, per bucket of the sample's caption, before caption dropout.

    Draws ``draws`` training images uniformly (as the trainer's batches do), a timestep, and a
    neighbour with ``draw_borrowing`` exactly as ``pogdiff.trainer`` does (tau from
    ``similarity_threshold``), and reports per bucket: ``share`` of the samples, ``psi_mean``,
    ``psi_q1..q4`` (mean psi per timestep quartile, q1 the least noise), ``psi_p90`` (its 90th
    percentile), ``active_share`` (psi > 0), ``s_img_mean`` (raw cosine of the drawn pairs that
    borrow) and ``density_factor`` (mean of (rho_eff / mean rho_eff)^(-b)); and ``tau`` under
    ``"overall"``. ``buckets[c]`` is caption c's bucket.
    """
    g = torch.Generator().manual_seed(seed)
    n = graph.caption_of.shape[0]
    idx = torch.randint(n, (draws,), generator=g)
    cap = graph.caption_of[idx]
    t = torch.randint(num_train_timesteps, (draws,), generator=g)
    tau = similarity_threshold(graph.image_features, graph.caption_of, pog.similarity_quantile)
    borrow = draw_borrowing(graph, idx, t, torch.zeros(draws, dtype=torch.bool), pog, tau, num_train_timesteps, g)
    psi, active = borrow.psi, borrow.active
    factor = graph.density_ratio.clamp_min(1e-12).pow(-pog.b)[cap]
    quartile = (t * 4 // num_train_timesteps).clamp(0, 3)
    bucket_of = np.array(buckets)[cap.numpy()]
    out: dict[str, dict[str, float]] = {}
    for name in (*sorted(set(buckets), key=lambda b: GROUPS.index(b) if b in GROUPS else len(GROUPS)), "overall"):
        sel = torch.from_numpy(bucket_of == name) if name != "overall" else torch.ones(draws, dtype=torch.bool)
        if not sel.any():
            continue
        out[name] = {
            "share": float(sel.float().mean()),
            "psi_mean": float(psi[sel].mean()),
            **{f"psi_q{q + 1}": float(psi[sel & (quartile == q)].mean()) for q in range(4) if (sel & (quartile == q)).any()},
            "psi_p90": float(torch.quantile(psi[sel], 0.9)),
            "active_share": float(active[sel].float().mean()),
            "s_img_mean": float(borrow.s_img[sel & active].mean()) if (sel & active).any() else math.nan,
            "density_factor": float(factor[sel].mean()),
        }
    out["overall"]["tau"] = tau
    return out


def pair_similarity(features: torch.Tensor, caption_of: torch.Tensor, a: int, b: int) -> float:
    """Mean s_img = clip(cos, 0, 1) over all image pairs of captions a and b (distinct images if a == b).

    features ``[N, F]`` L2-normalised, caption_of ``[N]``.
    """
    fa, fb = features[caption_of == a], features[caption_of == b]
    if len(fa) == 0 or len(fb) == 0:
        raise ValueError(f"caption {a if len(fa) == 0 else b} has no images")
    s = (fa @ fb.T).clamp(0, 1)
    if a == b:
        if len(fa) < 2:
            return math.nan
        return float((s.sum() - s.diagonal().sum()) / (len(fa) * (len(fa) - 1)))
    return float(s.mean())


def demo_similarity_table(
    features: torch.Tensor, caption_of: torch.Tensor, relation: dict[tuple[int, int], str]
) -> dict[str, dict[str, float]]:
    """Mean and spread of ``pair_similarity`` over the group pairs of each relation.

    ``caption_of`` ``[N]`` is each image's group: a caption, or an individual when captions are
    per image. ``relation[(a, b)]`` names the relation of group pair (a, b), e.g. ``same_colour``
    for a red circle and a red square. Returns ``{relation: {"mean", "min", "max", "pairs"}}``.
    """
    groups: dict[str, list[float]] = {}
    for (a, b), name in relation.items():
        v = pair_similarity(features, caption_of, a, b)
        if not math.isnan(v):
            groups.setdefault(name, []).append(v)
    return {k: {"mean": float(np.mean(v)), "min": float(np.min(v)), "max": float(np.max(v)), "pairs": len(v)}
            for k, v in sorted(groups.items())}
