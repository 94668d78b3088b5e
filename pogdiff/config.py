"""Typed configuration of the method library, and the strict base every stage config builds on.

Here: the index (caption embedding, neighbour graph, image feature), the objective (``PoGConfig``),
training, evaluation and its buckets, and the tune search. The pipeline's own stages live with the
layer that uses them: ingest, the gate and the registry in ``storage/config.py``, the whole retrain
config in ``tasks/config.py``. Each default is defined once, next to its key. Every model forbids
unknown keys, so a typo in a config file (``lamda: 2``) stops the run before any work starts with an
error that names the key. Options with a closed set of values are ``Literal`` types, validated at
load time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


Sampling = Literal["uniform", "repeats", "sqrt"]  # train.sampling, pogdiff/sampling.py


class ConfigError(ValueError):
    """A configuration file or mapping is invalid; the message names the offending key."""


class StageConfig(BaseModel):
    """A stage's config: frozen, and every unknown key is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class IndexConfig(StageConfig):
    """Caption embedding, the caption neighbour graph and the effective density."""

    # minilm: the packaged all-MiniLM-L6-v2; clip: a Stable Diffusion folder's own CLIP text encoder
    # (pooled output); sentence-transformers: any model that library loads from a local folder.
    embedder: Literal["minilm", "clip", "sentence-transformers"] = "minilm"
    embedder_path: str | None = None  # local folder; required by clip and sentence-transformers
    max_tokens: int = Field(128, ge=1)  # caption tokens embedded (also capped by the model's own limit)
    k: int = Field(5, ge=1)  # neighbours stored per caption
    density_bandwidth: float = Field(0.05, gt=0)  # kernel width in cosine distance (1 - cos)
    # Up to this many captions the graph is exact (C^2 matmuls); above it an all-pairs ANN search
    # (pogdiff/knn.py) proposes candidates, and the captions table gets a LanceDB ANN index for queries.
    ann_threshold: int = Field(20_000, ge=1)
    knn_engine: Literal["ivf_flat", "hnsw"] = "ivf_flat"  # faiss index of the all-pairs search
    ivf_lists: int = Field(0, ge=0)  # ivf_flat's inverted lists; 0: 4 sqrt(captions)
    ivf_nprobe: int = Field(16, ge=1)  # ivf_flat's lists searched per query: recall against time
    ann_candidates: int = Field(50, ge=2)  # ANN hits per caption: its top-k and its density come from these
    ann_index: Literal["IVF_HNSW_SQ", "IVF_PQ"] = "IVF_HNSW_SQ"  # LanceDB's index for `pogdiff index --query`
    # LanceDB versions older than this are pruned after each write, except the champion's (tagged) and
    # everything after it: a run's lineage tags resolve for at least this long, the champion's always.
    version_retention_days: float = Field(30.0, gt=0)
    # psi's image feature (pogdiff/features.py). unet: the diffusion model's own UNet, which sees identity
    # (bench/similarity.py: same product above same colour in 82% of pairs); pixels: downsampled pixels,
    # which see colour and position (48%: chance); dinov2 / clip: vision models for photos.
    image_feature: Literal["unet", "pixels", "dinov2", "clip"] = "unet"
    # unet: the diffusion model (None: the retrain's train.base_model, or the default base alone);
    # dinov2 / clip: a local folder or a hub id in the local cache
    image_feature_model: str | None = None
    image_feature_size: int = Field(16, ge=2)  # pixels only: side of the downsampled image used as feature
    batch_size: int = Field(64, ge=1)
    # Captions to embed are split into shards of this size, one task each, mapped over the flow's
    # task runner (threads by default; Dask with POGDIFF_TASK_RUNNER=dask).
    embed_shard_size: int = Field(10_000, ge=1)
    # The `rebuild-graph` flow (`pogdiff index --rebuild-graph`) searches the stored captions in shards
    # of this many rows, one task each, mapped over the task runner like the embedding shards.
    graph_shard_rows: int = Field(100_000, ge=1)

    @model_validator(mode="after")
    def _embedder_path(self) -> "IndexConfig":
        if self.embedder == "minilm" and self.embedder_path is not None:
            raise ValueError("embedder_path is only used by the clip and sentence-transformers embedders")
        if self.embedder != "minilm" and not self.embedder_path:
            raise ValueError(f"embedder '{self.embedder}' needs embedder_path (a local model folder)")
        if self.image_feature in ("dinov2", "clip") and not self.image_feature_model:
            raise ValueError(f"image_feature '{self.image_feature}' needs image_feature_model (a local folder or a cached hub id)")
        if self.image_feature == "pixels" and self.image_feature_model is not None:
            raise ValueError("image_feature_model is not used by image_feature 'pixels'")
        if self.ann_candidates <= self.k:
            raise ValueError("ann_candidates must exceed k (the caption itself and duplicates are among the hits)")
        return self

    @property
    def feature_model(self) -> str | None:
        """The model behind ``image_feature``: for ``unet`` without one, the default base model."""
        if self.image_feature == "unet" and self.image_feature_model is None:
            return TrainConfig.model_fields["base_model"].default
        return self.image_feature_model


class PoGConfig(StageConfig):
    """The objective and its neighbour weight (DESIGN §4, docs/method.md "The knobs").

    psi_i = lam * clip((s_img(i, i') - tau) / (1 - tau), 0, 1)^a * (rho_eff(y_i) / mean rho_eff)^(-b) * w(t)
    tau = the ``similarity_quantile`` of s_img over random pairs of training images.
    """

    method: Literal["vanilla", "pogdiff", "cbdm"] = "pogdiff"
    loss_form: Literal["B", "A"] = "B"
    # psi = 1 trusts the neighbour's prediction as much as the ground truth. Measured on the demo
    # catalogue (validation split, per-image captions, one seed): few-bucket accuracy 0.69 plain,
    # 0.68 at lam 0.02 (threshold quantile 0.9), 0.65 at 0.05, 0.56 at 0.2, 0.32 at 1. So the default
    # borrows little; `pogdiff tune` measures how much a data set allows.
    lam: float = Field(0.02, ge=0)
    a: float = Field(1.0, ge=0)
    b: float = Field(0.5, ge=0)
    k: int = Field(5, ge=1)  # neighbours drawn from (at most the index's k)
    # y' is drawn among the top-k in proportion to caption cosine x thresholded image similarity
    # (similarity), or uniformly among those above the threshold (uniform)
    neighbour_sampling: Literal["similarity", "uniform"] = "similarity"
    # The controls of docs/method.md: graph borrows from the drawn neighbour y'; random swaps in a caption
    # drawn uniformly from the others, self the sample's own caption y (the model's own prediction as
    # the second factor, as diffusers' DREAM). Both keep psi as the graph draw gave it, so the amount of
    # borrowing is the same and only whose prediction is borrowed changes.
    neighbour: Literal["graph", "random", "self"] = "graph"
    # tau as a quantile of s_img over random image pairs: pairs less alike than that never borrow
    similarity_quantile: float = Field(0.9, ge=0, lt=1)
    psi_threshold: float = Field(1e-3, ge=0)  # neighbour branch runs only where psi > threshold
    psi_max: float = Field(10.0, gt=0)
    # w(t): constant 1, t / T (borrow where noise is high: layout, identity) or 1 - t / T (detail)
    timestep_weight: Literal["constant", "linear", "inverse"] = "constant"
    # s_img's features: "index" = the index stage's image features; "latent" = the model's own z0
    # (the scaled VAE latent mean for Stable Diffusion, DESIGN §4), computed once by the trainer
    similarity_features: Literal["index", "latent"] = "index"
    cbdm_tau: float = Field(1.0, ge=0)


class TrainConfig(StageConfig):
    """Fine-tuning budget and optimisation."""

    base_model: str = "builtin:logos16"  # builtin name, pogdiff pixel folder, or Stable Diffusion folder / hub id
    steps: int = Field(200, ge=1)
    batch_size: int = Field(32, ge=1)  # global: under DDP each of W processes trains batch_size / W
    learning_rate: float = Field(2e-4, gt=0)
    lr_warmup_steps: int = Field(10, ge=0)
    # after the warm-up: constant, or cosine decay to 0 at the last step (pretraining, long runs)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    caption_dropout: float = Field(0.1, ge=0, lt=1)
    # Exposure balancing (pogdiff/sampling.py), per individual (the data's individual column, else per
    # caption): uniform draws every image equally often; repeats draws individual g as if its n_g images
    # were repeated min(n_max / n_g, max_repeats) times (kohya-ss num_repeats; users pick 10 to 100);
    # sqrt is LVIS repeat-factor sampling, r_g = max(1, sqrt(repeat_threshold / f_g)), f_g = n_g / N.
    sampling: Sampling = "uniform"
    max_repeats: float = Field(10.0, ge=1)
    # LVIS uses 0.001 over 1203 categories; with tens of individuals a share of 0.1 plays that part
    repeat_threshold: float = Field(0.1, gt=0, le=1)
    snr_gamma: float | None = Field(None, gt=0)  # Min-SNR-gamma weighting; 5.0 is the usual choice
    gradient_accumulation_steps: int = Field(1, ge=1)  # micro-batches of batch_size per optimizer step
    ema_decay: float | None = Field(None, ge=0, le=1)  # EMA of the weights; the saved model is the EMA
    lora_rank: int | None = Field(None, ge=1)  # LoRA on the attention projections instead of full fine-tuning
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # autocast of the forwards; fp16 needs CUDA
    prediction_type: Literal["epsilon", "v_prediction"] | None = None  # None: the base model's own
    seed: int = 0
    checkpoint_every: int = Field(100, ge=1)
    # Wall-clock budget of one training attempt, checked between steps; on expiry a checkpoint is
    # written and training stops with an error (a re-run resumes). None: no limit.
    time_limit_minutes: float | None = Field(None, gt=0)
    # > 1: the train task runs `accelerate launch --num_processes N -m tasks.train_cli` (DDP)
    num_processes: int = Field(1, ge=1)
    pog: PoGConfig = PoGConfig()


class BucketConfig(StageConfig):
    """Frequency buckets by training images per individual: many > many_above, few < few_below."""

    many_above: int = Field(100, ge=0)
    few_below: int = Field(20, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> "BucketConfig":
        if self.few_below > self.many_above + 1:
            raise ValueError("few_below must not exceed many_above + 1 (buckets would overlap)")
        return self


class EvaluateConfig(StageConfig):
    """Generation for evaluation and the metrics computed on it (per individual, DESIGN §6).

    Individual i with |T_i| training images gets N_i = max(min_images_per_individual,
    min(|T_i|, max_images_per_individual)) generated images, prompted with its own training captions.
    """

    # The metadata key naming each image's individual (the unit of the long tail, the buckets and
    # gRecall). None, or a dataset whose metadata lacks the key: each distinct caption is its own individual.
    individual_column: str | None = Field("individual", min_length=1)
    # N_max caps the generation cost of the head; N_min gives a rare individual enough samples for a
    # stable accuracy. Every individual with |T_i| <= N_max gets N_i >= |T_i|, so its raw gRecall is
    # not capped below 1 (the whole few bucket when buckets.few_below <= N_max + 1).
    max_images_per_individual: int = Field(32, ge=1)
    min_images_per_individual: int = Field(8, ge=1)
    num_inference_steps: int = Field(25, ge=1)
    # 1.0 = no guidance; the small embedded model over-saturates above ~1.5 (measured: detector
    # accuracy 1.00 at 1.0, 0.67 at 1.5, 0.02 at 3.0). Stable Diffusion checkpoints want ~7.5.
    guidance_scale: float = Field(1.0, ge=0)
    seed: int = Field(1234, ge=0)  # seeds the prompt draw and the initial noise
    batch_size: int = Field(128, ge=1)
    # pixels: offline, exactly reproducible (tests, demo); dinov2 / clip: transformers vision models
    # for real photos, loaded from feature_model (a local folder or a hub id in the local cache)
    feature_extractor: Literal["pixels", "dinov2", "clip"] = "pixels"
    feature_model: str | None = None
    feature_size: int = Field(16, ge=2)  # pixels only: side of the downsampled image
    gate: Literal["judge", "nearest"] = "judge"  # gRecall accuracy gate (DESIGN §6)
    buckets: BucketConfig = BucketConfig()

    @model_validator(mode="after")
    def _image_counts(self) -> "EvaluateConfig":
        if self.min_images_per_individual > self.max_images_per_individual:
            raise ValueError(f"min_images_per_individual ({self.min_images_per_individual}) must not exceed "
                             f"max_images_per_individual ({self.max_images_per_individual})")
        return self

    @model_validator(mode="after")
    def _feature_model(self) -> "EvaluateConfig":
        needs = self.feature_extractor != "pixels"
        if needs and not self.feature_model:
            raise ValueError(f"feature_model is required when feature_extractor is {self.feature_extractor!r} "
                             "(a local folder or a hub id in the local cache)")
        if not needs and self.feature_model:
            raise ValueError("feature_model is only used by the dinov2 and clip extractors, not by 'pixels'")
        return self


class TuneSpace(StageConfig):
    """Where ``pogdiff tune`` searches psi's knobs: [low, high] ranges (low == high: fixed) and choices."""

    lam: tuple[float, float] = (0.005, 0.5)  # log-uniform; lam = 0 (plain fine-tuning) is always the reference trial
    a: tuple[float, float] = (0.5, 2.0)
    b: tuple[float, float] = (0.0, 1.0)
    k: tuple[int, int] = (1, 5)
    similarity_quantile: tuple[float, float] = (0.0, 0.95)
    timestep_weight: tuple[Literal["constant", "linear", "inverse"], ...] = ("constant", "linear", "inverse")
    # Exposure balancing is searched beside borrowing: a trial picks a sampling mode, then its knob
    # (log-uniform), then, for a balanced trial, whether to borrow at all, so balancing alone competes too.
    sampling: tuple[Sampling, ...] = ("uniform", "repeats", "sqrt")
    repeat_threshold: tuple[float, float] = (0.02, 0.5)  # sqrt's t
    max_repeats: tuple[float, float] = (3.0, 30.0)  # repeats' cap

    @model_validator(mode="after")
    def _ranges(self) -> "TuneSpace":
        for name in ("lam", "a", "b", "k", "similarity_quantile", "repeat_threshold", "max_repeats"):
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(f"{name}: low {low} exceeds high {high}")
        if self.lam[0] <= 0:
            raise ValueError("lam: the range is searched on a log scale and must be above 0 (lam = 0 is always tried)")
        if self.b[0] < 0 or self.a[0] < 0 or self.k[0] < 1:
            raise ValueError("a and b must be >= 0 and k >= 1")
        if not 0 <= self.similarity_quantile[0] or not self.similarity_quantile[1] < 1:
            raise ValueError("similarity_quantile must lie in [0, 1)")
        if not self.timestep_weight or not self.sampling:
            raise ValueError("timestep_weight and sampling need at least one choice each")
        if not (0 < self.repeat_threshold[0] and self.repeat_threshold[1] <= 1):
            raise ValueError("repeat_threshold must lie in (0, 1]")
        if self.max_repeats[0] < 1:
            raise ValueError("max_repeats must be >= 1")
        return self


class TuneConfig(StageConfig):
    """``pogdiff tune``: short fine-tunes over psi's knobs, scored on a validation draw (pogdiff/tune.py)."""

    trials: int = Field(8, ge=1)  # searched trials, after the lam = 0 reference trial
    steps_per_trial: int | None = Field(None, ge=1)  # None: train.steps
    time_limit_minutes: float | None = Field(None, gt=0)  # no trial starts after this (the finished ones count)
    # Trials per batch, mapped over the flow's task runner. On a machine with one accelerator or few
    # cores, parallel trials only slow each other down.
    parallel_trials: int = Field(1, ge=1)
    # The validation draw: evaluation with this seed (other prompts drawn, other noise), never the
    # evaluate section's seed, on which the reported scores are computed.
    eval_seed: int = Field(4321, ge=0)
    # Feasible trials keep many-bucket accuracy within this of the reference's (the gate's head check).
    head_max_drop: float = Field(0.03, ge=0)
    # The tune measures its own noise: the reference (plain fine-tuning) trains on this many seeds
    # (train.seed, train.seed + 1, ...), and a trial (trained on train.seed, scored on the same prompts:
    # paired) is chosen only when it beats the reference's score by more than the reference's spread
    # over its seeds. Measured on a real-image hold-out: one draw scored plain fine-tuning 0.302 and a
    # trial that is almost the same training 0.215, so a single reference run cannot tell noise from effect.
    reference_seeds: int = Field(2, ge=2)
    # The validation draw generates at least this many images per individual (evaluate's N_min is the
    # floor): a rare individual's accuracy from 8 images moves in steps of 0.125.
    validation_images_per_individual: int = Field(16, ge=1)
    seed: int = 0  # the sampler's seed (TPE)
    space: TuneSpace = TuneSpace()


def _explain(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown config key '{key}'")
        else:
            parts.append(f"config key '{key}': {e['msg']}")
    return "; ".join(parts)


M = TypeVar("M", bound=StageConfig)


def parse_config(data: dict[str, Any] | None, model: type[M]) -> M:
    """Validate a mapping into ``model``; raise ``ConfigError`` naming each bad key."""
    try:
        return model.model_validate(data or {})
    except ValidationError as err:
        raise ConfigError(_explain(err)) from None


def load_config(path: str | Path | None, model: type[M]) -> M:
    """Read a YAML file into ``model``; ``None`` gives the defaults."""
    return model() if path is None else parse_config(read_config_file(path), model)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping a config YAML file holds (``{}`` for an empty file), unvalidated; a missing or
    unreadable file, or one that holds no mapping, is one ``ConfigError`` line."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping, not {type(data).__name__}")
    return data or {}
