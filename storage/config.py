"""Configs of the store-facing stages: how a source is ingested, the promotion gate and the registry.

Built on the method library's strict base (``pogdiff.config.StageConfig``): unknown keys are errors
that name the key. The retrain config that gathers every stage's section is ``tasks.config.RetrainConfig``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pogdiff.config import StageConfig


class IngestConfig(StageConfig):
    """How a caption–image source is read and validated."""

    # folder = images + captions file; parquet = *.parquet with image bytes; webdataset = *.tar shards
    source_kind: Literal["auto", "folder", "parquet", "webdataset"] = "auto"
    captions_file: str = "captions.csv"  # csv or jsonl, relative to the source folder
    image_column: str = "image"  # captions-file path column; Parquet bytes/struct/path column
    caption_column: str = "caption"  # also the caption key of a WebDataset sample's .json member
    # train | holdout per row (a missing column or an empty value: train); also a key of a WebDataset
    # sample's .json member or a member of its own (key.split). Held-out rows never train.
    split_column: str = "split"
    allowed_formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP")
    min_side: int = Field(8, ge=1)  # pixels; smaller images are rejected
    max_pixels: int = Field(64_000_000, ge=1)  # decompression-bomb guard, checked before decoding
    # Byte caps, checked before anything is read into memory: an encoded image (file, Parquet cell or
    # tar member) and any other tar member (caption, JSON). A chunk of inputs in flight holds at most
    # about workers x max_image_bytes of image data, whatever the source.
    max_image_bytes: int = Field(50_000_000, ge=1)
    max_member_bytes: int = Field(1_000_000, ge=1)
    max_caption_chars: int = Field(1000, ge=1)
    caption_overflow: Literal["reject", "truncate"] = "reject"
    same_image_other_caption: Literal["keep", "reject"] = "keep"
    resolution: int = Field(512, ge=8)  # side of the stored square RGB image
    aspect: Literal["center_crop", "pad"] = "center_crop"  # how a non-square image becomes square
    upscale: bool = False  # False: smaller images are squared at their own size, never enlarged
    image_encoding: Literal["png", "webp"] = "png"  # png lossless; webp lossy (quality 90), smaller
    # Decode/validate pool. Threads measured equal to spawned processes at steady state (PIL releases
    # the GIL while decoding, resizing and encoding) and start 0.8 s faster; see bench/ingest.py.
    parallelism: Literal["threads", "processes"] = "threads"


class GateConfig(StageConfig):
    """Promotion gate, against the current champion's run metrics (docs/lifecycle.md).

    Promote when  gain(metric) >= min_improvement  and  worsening(guard_metric) <= allowed  and
    champion head_metric - new head_metric <= head_max_drop, where gain/worsening are signed by each
    metric's direction and allowed is max_worsening (absolute) or max_worsening * |champion's guard
    value| (relative). No champion: promote.
    """

    metric: str = "few/grecall"
    higher_is_better: bool = True
    min_improvement: float = Field(0.01, ge=0)  # 0 also promotes a tie
    # None: no guard. The default is the Fréchet distance of the default evaluation (pixels, 16); a
    # retrain config that leaves it unset guards with the Fréchet distance its own evaluation reports.
    guard_metric: str | None = "overall/frechet_pixels16"
    guard_lower_is_better: bool = True
    # relative, so one default fits every feature extractor's Fréchet distance scale
    max_worsening: float = Field(0.05, ge=0)
    worsening: Literal["relative", "absolute"] = "relative"
    # The head check (higher is better, absolute): a candidate whose well-covered individuals got worse
    # than this is never promoted, whatever its gain on rare ones: that is how a collapse of the caption
    # conditioning shows (measured: PoGDiff at lam 1 took many-bucket accuracy from 0.75 to 0.41). None: off.
    head_metric: str | None = "many/accuracy"
    head_max_drop: float = Field(0.03, ge=0)
    # guard or head value missing on either side: reject (safe) or decide without it (recorded as skipped)
    missing_guard: Literal["reject", "skip"] = "reject"

    @model_validator(mode="after")
    def _distinct(self) -> "GateConfig":
        if self.guard_metric == self.metric:
            raise ValueError("guard_metric must differ from metric")
        if self.head_metric == self.metric:
            raise ValueError("head_metric must differ from metric")
        return self


class RegisterConfig(StageConfig):
    """MLflow experiment, registered model and the promotion gate."""

    experiment: str = "pogdiff"
    model_name: str = "pogdiff-demo"
    gate: GateConfig = GateConfig()
