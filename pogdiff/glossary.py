"""What every evaluation metric means: one line of definition, which direction is better, and how a
bucket's and the overall value are formed. The one place the project says it; the MLflow glossary
artifact, the version descriptions, the reports and the docs' glossary (docs/evaluation.md) are
written from it.

Metric names say what they measure. The Fréchet distance is named after the features it is
computed on (``frechet_pixels16``, ``frechet_dinov2``, ``frechet_clip``): ``fid`` would claim
Inception features, which no extractor here uses. Pure: no torch, no IO.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Literal

__all__ = ["BUCKETS", "FRECHET_PREFIX", "GROUPS", "HOLDOUT_METRICS", "OVERALL_VS_BUCKETS", "OVERALL_VS_BUCKETS_SHORT", "MetricInfo", "describe", "evaluated_metrics", "frechet_metric", "glossary",
           "glossary_json", "glossary_list", "glossary_markdown", "is_known", "lower_is_better", "rank"]

Bucket = Literal["many", "medium", "few"]
BUCKETS: tuple[Bucket, ...] = ("many", "medium", "few")
GROUPS = (*BUCKETS, "overall")  # prefixes of the reported metric keys "<group>/<metric>"
Direction = Literal["higher", "lower"]
FRECHET_PREFIX = "frechet_"  # frechet_<feature>: the feature names the extractor (and, for pixels, its size)


@dataclass(frozen=True)
class MetricInfo:
    """``name``; ``direction`` (which is better); ``definition`` (one line); ``aggregation`` (how a
    bucket's value and the overall value are formed from individuals or images)."""

    name: str
    direction: Direction
    definition: str
    aggregation: str


_MEAN = "mean over the bucket's individuals; overall: mean over all individuals"
_POOLED = ("computed once on the pooled images of the bucket's individuals (overall: of all individuals), "
           "not averaged; left out when either side has fewer than 10 images")

_FIXED = (
    MetricInfo("grecall", "higher",
               "generative recall: share of an individual's training images that are the nearest training image of "
               "one of its accepted generated images (at most N_i / |T_i|)", _MEAN),
    MetricInfo("grecall_norm", "higher",
               "covered training images / min(N_i, |T_i|): gRecall over its ceiling; equals grecall where N_i >= |T_i|",
               _MEAN),
    MetricInfo("accuracy", "higher",
               "share of an individual's generated images that show it: the demo's exact detector where it applies "
               "(evaluate.gate: judge), else the nearest-individual test", _MEAN),
    MetricInfo("nearest_accuracy", "higher",
               "share of an individual's generated images whose nearest real image (over all individuals) is one of "
               "its own", _MEAN),
    MetricInfo("similarity", "higher",
               "mean cosine similarity of an individual's generated to its real images in the evaluation's feature "
               "space (the DINO-score analogue)", _MEAN),
    MetricInfo("separability", "higher",
               "normalised mutual information between the individual each image was prompted for and the one it "
               "shows: 1 = every individual told apart, 0 = the caption conditioning has collapsed",
               "overall only: computed once over all generated images"),
)
# Reported only when the data has held-out photos (prompt_fidelity only with an attribute reader too).
_HELD_OUT_MEAN = ("mean over the bucket's individuals that have held-out photos (buckets by training count); overall: "
                  "mean over all individuals with held-out photos")
_HOLDOUT = (
    MetricInfo("holdout_accuracy", "higher",
               "share of the images generated from an individual's held-out captions (photos never trained on) that "
               "show it, by the same test as accuracy", _HELD_OUT_MEAN),
    MetricInfo("holdout_grecall", "higher",
               "gRecall against the held-out photos: share of an individual's held-out photos that are the nearest "
               "held-out photo of one of its accepted images generated from held-out captions", _HELD_OUT_MEAN),
    MetricInfo("prompt_fidelity", "higher",
               "share of the images generated from held-out captions whose attributes, read off the image (the demo's "
               "detector), equal those read off the held-out photo whose caption prompted it", _HELD_OUT_MEAN),
    MetricInfo("copy_rate", "lower",
               "share of the images generated from held-out captions that reproduce one of the individual's training "
               "photos instead of the prompt: read attributes that differ from the prompt photo's and equal a training "
               "photo's, or without an attribute reader a cosine to the nearest own training photo above the 95th "
               "percentile of the held-out photos' own (the run's info says which)", _HELD_OUT_MEAN),
)
HOLDOUT_METRICS = tuple(m.name for m in _HOLDOUT)
# Runs logged before the Fréchet distance was named after its feature still hold it as ``fid``; the
# entry lets `pogdiff compare` and `pogdiff models` read those runs the right way round.
_LEGACY = MetricInfo("fid", "lower",
                     "runs logged before the rename only: the Fréchet distance in that run's evaluate.feature_extractor "
                     "space (now frechet_<feature>), not Inception FID", _POOLED)
_BY_NAME = {m.name: m for m in (*_FIXED, *_HOLDOUT, _LEGACY)}
# display order; the Fréchet distances (one name per feature) stand where FRECHET_PREFIX does
_ORDER = ("grecall", "grecall_norm", "accuracy", "nearest_accuracy", "similarity", FRECHET_PREFIX, "fid", "separability",
          *HOLDOUT_METRICS)
_FEATURES = {
    "pixels": "the image area-downsampled to {size}x{size} pixels, centred and L2-normalised",
    "dinov2": "a DINOv2 model's pooled CLS token",
    "clip": "a CLIP vision model's image embedding",
}

OVERALL_VS_BUCKETS = (
    "Why overall differs from the buckets: the metrics scored per individual (all but the Fréchet distance and "
    "separability) are means over individuals, so their overall value is the buckets' values weighted by their number "
    "of individuals and lies between the lowest and the highest bucket. The Fréchet distance is not a mean of the "
    "bucket values: it is computed once on the pooled images of all individuals, and it can be lower than every "
    "bucket's value. Its estimate is biased upward by the finite sample (the squared mean difference alone by "
    "tr(S_g)/N_g + tr(S_r)/N_r), and the pooled set has the most images, so the least bias; and bucket mean errors "
    "that point different ways partly cancel in the pooled mean. Compare Fréchet values only at the same feature "
    "extractor and image counts."
)

# The same in two sentences, where space is short (a model version's description).
OVERALL_VS_BUCKETS_SHORT = (
    "Overall values: the Fréchet distance is computed once on every image pooled, with the least finite-sample bias, "
    "so it can be lower than every bucket's; the other metrics' overall values are means over individuals."
)


def frechet_metric(extractor: str, size: int | None = None) -> str:
    """The Fréchet distance's metric name for ``evaluate.feature_extractor`` = ``extractor``:
    ``frechet_pixels<size>`` (``size`` = ``evaluate.feature_size``), ``frechet_dinov2``, ``frechet_clip``."""
    if extractor not in _FEATURES:
        raise ValueError(f"no Fréchet metric for feature extractor {extractor!r}; known: {sorted(_FEATURES)}")
    if extractor == "pixels":
        if size is None:
            raise ValueError("the pixels extractor's Fréchet metric needs its feature size")
        return f"{FRECHET_PREFIX}pixels{int(size)}"
    return FRECHET_PREFIX + extractor


def _frechet(name: str) -> MetricInfo | None:
    feature = name[len(FRECHET_PREFIX):]
    size = feature[len("pixels"):] if feature.startswith("pixels") else None
    if size is not None and size.isdigit():
        what = _FEATURES["pixels"].format(size=size)
    elif feature in _FEATURES and feature != "pixels":
        what = _FEATURES[feature]
    else:
        return None
    definition = (f"Fréchet distance d² between Gaussians fitted to the generated and the real images' features, "
                  f"here {what} (not Inception features: not comparable with published FID)")
    return MetricInfo(name, "lower", definition, _POOLED)


def describe(name: str) -> MetricInfo:
    """The glossary entry of metric ``name`` (without its ``<bucket>/`` prefix); ``KeyError`` naming
    it when the project computes no such metric."""
    info = _BY_NAME.get(name) or (_frechet(name) if name.startswith(FRECHET_PREFIX) else None)
    if info is None:
        raise KeyError(f"no metric {name!r} in the glossary (pogdiff/glossary.py); known: "
                       f"{', '.join([m.name for m in (*_FIXED, *_HOLDOUT)] + [FRECHET_PREFIX + '<feature>'])}")
    return info


def evaluated_metrics(extractor: str, size: int | None = None, holdout: bool = False) -> tuple[str, ...]:
    """The metric names an evaluation with this feature extractor (and pixel size) reports, in display
    order; with ``holdout``, also those it reports on data with held-out photos (``prompt_fidelity``
    needs an attribute reader as well)."""
    held_out = list(HOLDOUT_METRICS) if holdout else []
    return tuple(sorted([m.name for m in _FIXED] + [frechet_metric(extractor, size)] + held_out, key=rank))


def is_known(name: str) -> bool:
    """Whether ``name`` is a metric the evaluation computes (``describe`` has it)."""
    try:
        describe(name)
    except KeyError:
        return False
    return True


def lower_is_better(name: str) -> bool:
    """Whether a smaller value of metric ``name`` is better; an unknown metric counts as higher is better."""
    return is_known(name) and describe(name).direction == "lower"


def rank(name: str) -> tuple[int, str]:
    """Sort key in display order: the glossary's order, unknown names after it, alphabetically."""
    family = FRECHET_PREFIX if name.startswith(FRECHET_PREFIX) and is_known(name) else name
    return (_ORDER.index(family), name) if family in _ORDER else (len(_ORDER), name)


def glossary(names: Iterable[str]) -> dict:
    """JSON-ready glossary of ``names`` (metric names, or ``<bucket>/<metric>`` keys; unknown ones are
    left out): ``{"metrics": {name: {direction, definition, aggregation}}, "overall_vs_buckets": text}``."""
    metrics = sorted({n.split("/", 1)[-1] for n in names} - {""}, key=rank)
    entries = {m: {k: v for k, v in asdict(describe(m)).items() if k != "name"} for m in metrics if is_known(m)}
    return {"metrics": entries, "overall_vs_buckets": OVERALL_VS_BUCKETS}


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # |T_i| must not end a table cell


def glossary_markdown(names: Iterable[str], heading: str = "## Metrics glossary") -> str:
    """The same as markdown: a table (metric, better, definition, bucket and overall) and the note on
    overall versus bucket values."""
    data = glossary(names)
    rows = [f"| `{m}` | {e['direction']} | {_cell(e['definition'])} | {_cell(e['aggregation'])} |" for m, e in data["metrics"].items()]
    return "\n".join([heading, "", "| metric | better | definition | bucket and overall |", "|---|---|---|---|", *rows,
                      "", data["overall_vs_buckets"], ""])


def glossary_list(names: Iterable[str], note: str = OVERALL_VS_BUCKETS) -> str:
    """The short form for descriptions and reports: one markdown bullet per metric (name, which
    direction is better, definition), then ``note`` on overall versus bucket values."""
    rows = [f"- `{m}` ({e['direction']} is better): {e['definition']}" for m, e in glossary(names)["metrics"].items()]
    return "\n".join([*rows, "", note]) + "\n"


def glossary_json(names: Iterable[str]) -> str:
    """``glossary(names)`` as indented JSON text."""
    return json.dumps(glossary(names), indent=2, ensure_ascii=False) + "\n"
