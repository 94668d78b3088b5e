"""The retrain config: one section per stage, read from one YAML file (``configs/demo.yaml``).

The sections are the stages' own configs: ``storage.config`` (ingest, registry and its gate) and
``pogdiff.config`` (index, train, evaluate, tune). ``load_config`` / ``parse_config`` read a file or
mapping into a ``RetrainConfig``; ``pogdiff.config``'s of the same name read any one stage's config.
A flow's ``config`` parameter is a ``RetrainConfig`` or a reference to its file, with ``overrides``
merged on top (``resolve_config``): what a deployment or a scheduler passes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import model_validator

from pogdiff import config as stage_config
from pogdiff.config import EvaluateConfig, IndexConfig, StageConfig, TrainConfig, TuneConfig
from pogdiff.config import ConfigError, read_config_file
from pogdiff.glossary import GROUPS, evaluated_metrics, frechet_metric
from storage.config import IngestConfig, RegisterConfig
from storage.settings import REPO_ROOT

SHIPPED_CONFIGS = REPO_ROOT / "configs"  # the configs this repository ships (`demo`)


class RetrainConfig(StageConfig):
    """The whole retrain flow: one section per stage."""

    ingest: IngestConfig = IngestConfig()
    index: IndexConfig = IndexConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    registry: RegisterConfig = RegisterConfig()  # the register stage ("register" would shadow BaseModel.register)
    tune: TuneConfig = TuneConfig()  # only `pogdiff tune` reads it

    @model_validator(mode="after")
    def _validation_draw(self) -> "RetrainConfig":
        if self.tune.eval_seed == self.evaluate.seed:
            raise ValueError(f"tune.eval_seed ({self.tune.eval_seed}) must differ from evaluate.seed: trials are scored "
                             "on a validation draw, not on the one reported scores come from")
        return self

    @model_validator(mode="after")
    def _gate_on_evaluated_metrics(self) -> "RetrainConfig":
        """Every metric the gate reads must be one the evaluation reports: a name it never logs would
        leave the check ``missing`` on every version, so no version would ever be promoted."""
        names = evaluated_metrics(self.evaluate.feature_extractor, self.evaluate.feature_size)
        gate = self.registry.gate
        for field in ("metric", "guard_metric", "head_metric"):
            key = getattr(gate, field)
            group, _, name = (key or "").partition("/")
            if key is not None and (group not in GROUPS or name not in names):
                renamed = " (fid is now named after its feature, see pogdiff/glossary.py)" if name == "fid" else ""
                raise ValueError(f"registry.gate.{field} {key!r} is not a metric the evaluation reports{renamed}: give "
                                 f"'<bucket>/<metric>' with bucket one of {', '.join(GROUPS)} and metric one of "
                                 f"{', '.join(names)} (evaluate.feature_extractor {self.evaluate.feature_extractor!r})")
        return self

    @model_validator(mode="before")
    @classmethod
    def _guard_on_the_evaluated_frechet(cls, data: Any) -> Any:
        """A gate without its own ``guard_metric`` guards with the overall Fréchet distance of this
        config's evaluation (named after its feature: ``overall/frechet_dinov2`` for ``dinov2``)."""
        if not isinstance(data, dict):
            return data
        registry, evaluate = data.get("registry") or {}, data.get("evaluate") or {}
        gate = (registry.get("gate") or {}) if isinstance(registry, dict) else None
        if not isinstance(evaluate, dict) or not isinstance(gate, dict) or "guard_metric" in gate:
            return data  # set by the user, or a section given as a model: the field validation has its say
        fields = EvaluateConfig.model_fields
        try:
            metric = frechet_metric(evaluate.get("feature_extractor", fields["feature_extractor"].default),
                                    int(evaluate.get("feature_size", fields["feature_size"].default)))
        except (TypeError, ValueError):
            return data  # a bad extractor or size: the evaluate section's validation names it
        return {**data, "registry": {**registry, "gate": {**gate, "guard_metric": f"overall/{metric}"}}}

    @model_validator(mode="before")
    @classmethod
    def _unet_feature_of_the_base(cls, data: Any) -> Any:
        """``index.image_feature: unet`` without a model uses the UNet being fine-tuned (``train.base_model``)."""
        if not isinstance(data, dict):
            return data
        index, train = data.get("index") or {}, data.get("train") or {}
        if not isinstance(index, dict) or not isinstance(train, dict):
            return data  # the field validation names the bad section
        feature = index.get("image_feature", IndexConfig.model_fields["image_feature"].default)
        if feature == "unet" and index.get("image_feature_model") is None and train.get("base_model"):
            return {**data, "index": {**index, "image_feature_model": train["base_model"]}}
        return data


def parse_config(data: dict[str, Any] | None) -> RetrainConfig:
    """Validate a mapping into a ``RetrainConfig``; raise ``ConfigError`` naming each bad key."""
    return stage_config.parse_config(data, RetrainConfig)


def load_config(path: str | Path | None) -> RetrainConfig:
    """Read a YAML file into a ``RetrainConfig``; ``None`` gives the defaults."""
    return stage_config.load_config(path, RetrainConfig)


def config_file(ref: str, configs_dir: Path) -> Path:
    """The YAML file a config reference names: an absolute path as it is; a relative path or a bare
    name (``demo`` is ``demo.yaml``) in ``configs_dir`` (settings), else in the repository's configs/."""
    path = Path(ref).expanduser()
    if path.is_absolute():
        return path
    if path.suffix not in (".yaml", ".yml"):
        path = path.with_name(path.name + ".yaml")
    tried = [Path(configs_dir) / path, SHIPPED_CONFIGS / path]
    for candidate in tried:
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config {ref!r} not found: no {tried[0]} (POGDIFF_CONFIGS_DIR) and no {tried[1]}")


def merged(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` on top, mapping into mapping (a partial section changes only the keys
    it names); any other value replaces the base's."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merged(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) else value
    return out


def resolve_config(config: str | RetrainConfig, overrides: Mapping[str, Any] | None, configs_dir: Path) -> RetrainConfig:
    """A flow's config: ``config`` (a ``RetrainConfig``, or a reference to its file: see ``config_file``)
    with ``overrides`` (a partial config mapping) merged on top. Unknown keys and bad values raise
    ``ConfigError`` naming the key and, for a file, the file."""
    if isinstance(config, RetrainConfig):
        if not overrides:
            return config
        # the keys given, so a validator's derived value (the unet feature's model) follows the overrides
        return parse_config(merged(config.model_dump(mode="json", exclude_unset=True), overrides))
    path = config_file(config, configs_dir)
    try:
        return parse_config(merged(read_config_file(path), overrides or {}))
    except ConfigError as err:
        raise ConfigError(f"config {path}{' with overrides' if overrides else ''}: {err}") from None
