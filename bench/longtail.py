"""The long-tail ladder: what a user would pick for rare products, against PoGDiff, at equal steps.

    python -m bench.longtail                            # the reported run: per-image and families, seeds 0 1 2
    python -m bench.longtail --variants families        # one variant
    python -m bench.longtail --methods vanilla repeats  # some methods (those needing no validation run at once)
    python -m bench.longtail --quick                    # smoke test: tiny base and data, 3 steps, one trial

Every method fine-tunes the same base with the config's train recipe (``--config``, default
configs/demo.yaml), on the same data order and evaluation seeds, for the same number of steps. The
ladder (``METHODS``): plain fine-tuning (``vanilla``); exposure balancing as users do it, per-product
repeats (``repeats``, kohya-ss num_repeats) and repeat-factor sampling (``sqrt``, LVIS); ``cbdm`` with
its tau chosen on validation; PoGDiff tuned on validation with uniform sampling (``pogdiff_tuned``);
the tune's best balanced configuration without borrowing (``balanced``) and with it
(``pogdiff_balanced``); and the two controls with that same sampling and psi, the neighbour drawn at
random (``random_neighbour``) and y' = y (``self_target``), which show whether the *neighbour* helps.
When the tune chooses balancing alone, PoGDiff gets a second chance on exactly that sampling: the
tune's balancing (``tuned_balancing``), with PoGDiff's default psi knobs at the lam of ``LAM_GRID``
that scores best on validation (``tuned_balancing_pogdiff``), and its two controls
(``tuned_balancing_random``, ``tuned_balancing_self``).

Variants (``VARIANTS``): ``per-image`` is the demo catalogue (24 products, 200 down to 3 photos,
each product a unique look); ``families`` is the catalogue where the premise holds (each rare
product is a one-attribute variant of a best seller and named after it, beside rare controls that
resemble no family; tails of 1, 3 and 10 photos); ``individual`` (one caption per product) is kept
for its committed results. Every product has held-out photos (sizes, positions and backgrounds it
was never photographed in); evaluation prompts with their captions too and reports held-out
accuracy and gRecall, prompt fidelity and copy rate (pogdiff/glossary.py).

Splits, fixed up front: *validation* = the variant's data of data seed 1 (another rendering), scored
with the tune's ``eval_seed``; *test* = data seed 0, evaluation seeds 1234 + s. Per variant:

1. validation (only for the methods that need it): ``pogdiff tune`` itself (a subprocess on its own
   home: Prefect, MLflow and the Optuna journal, as a user runs it) over sampling and psi's knobs, with
   the reference (plain fine-tuning) on two seeds for its noise; then CBDM's tau over CBDM_TAUS, chosen
   by the same score and feasibility rule (``pogdiff.tune.choose``) against the tune's reference;
2. test: every method x seed. A method whose training equals another's (e.g. ``pogdiff_tuned`` when
   the tune chose lam = 0) shares its rows: runs are keyed by what determines them.

Each finished piece is kept in ``--state`` (default bench/results/longtail-state: the runs as JSON
lines, each variant's tune journal and chosen config) at once, so an interrupted run resumes where it
stopped, even in another checkout or session; ``--work`` (default var/bench/longtail) is scratch,
with the held-out grids of seed 0 of every method. ``runtime_s`` is the compute of all invocations
together. Writes (atomically) ``longtail.json`` (per variant: validation, method -> bucket -> metric
-> mean, std, per-seed values, per-role figures on families, the goals, the competence check,
diagnostics), ``longtail.md`` and two plots per variant in ``--out`` (default bench/results). Prints
one JSON summary.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from pogdiff.atomic import write_bytes_atomic
from pogdiff.config import EvaluateConfig, PoGConfig, TrainConfig
from pogdiff.demo import catalogue, detector, folder
from pogdiff.evaluation import RealSet, evaluate
from pogdiff.grids import comparison_grid
from pogdiff.longtail import (
    aggregate,
    claim_check,
    competence_check,
    demo_similarity_table,
    markdown_table,
    no_harm_check,
    psi_by_bucket,
    role_table,
)
from pogdiff.metrics import BUCKETS, assign_buckets
from pogdiff.neighbours import NeighbourGraph
from pogdiff.pipelines.base import META_FILE, to_tensor
from pogdiff.pipelines.loader import load_pipeline
from pogdiff.pipelines.pixel import UNetSpec
from pogdiff.train_data import individual_ids
from pogdiff.trainer import TrainData, train
from pogdiff.tune import JOURNAL_FILE, STUDIES_DIR, TUNED_FILE, TrialResult, choose, feasible, score, trials_table
from tasks.config import RetrainConfig, load_config, parse_config

REPO = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO / "configs" / "demo.yaml"  # index, train recipe and evaluate sections (judge, N, buckets)
RESULTS = Path(__file__).resolve().parent / "results"
WORK = REPO / "var" / "bench" / "longtail"  # scratch
STATE = RESULTS / "longtail-state"  # small, kept with the results, so a benchmark can span sessions
PROTOCOL = 2  # in every run's key: 2 = held-out photos in the data and the evaluation


@dataclass(frozen=True)
class Variant:
    """One data set of the ladder: the catalogue kind and caption mode of ``folder.generate_longtail``,
    and the buckets it is read with (None: the config's)."""

    catalogue: str
    captions: str
    few_below: int | None = None


VARIANTS = {
    "per-image": Variant("zipf", "per-image"),
    # tails of 1, 3 and 10 photos are all "few": 10 must fall below the threshold
    "families": Variant("families", "per-image", few_below=11),
    "individual": Variant("zipf", "individual"),
}
DEFAULT_VARIANTS = ("per-image", "families")
SEEDS = (0, 1, 2)
METHODS = ("vanilla", "repeats", "sqrt", "cbdm", "pogdiff_tuned", "balanced", "pogdiff_balanced", "random_neighbour", "self_target",
           "tuned_balancing", "tuned_balancing_pogdiff", "tuned_balancing_random", "tuned_balancing_self")
NEEDS_VALIDATION = set(METHODS) - {"vanilla", "repeats", "sqrt"}
# When the tune chooses balancing alone, PoGDiff gets a second chance on top of exactly that sampling:
# its default psi knobs at each of these lam, the best by validation score (feasible, no noise margin).
LAM_GRID = (0.02, 0.1, 0.5)
# The official default is 1.0; on the demo catalogue tau 1.0 scored 0.100 on validation against 0.603 at 0.1
# (bench/results/longtail-2026-12-03/longtail.md), so the ladder sweeps the two smaller values.
CBDM_TAUS = (0.1, 0.3)
QUICK_CBDM_TAUS = (0.1, 1.0)  # a smoke run: two entries prove the sweep and the choice
TUNE_TRIALS = 8  # searched trials per variant after the reference's two seeds: about 25 minutes on 2 cores
SPLITS = {"test": {"data_seed": 0, "eval_seed": 1234}, "validation": {"data_seed": 1}}
LIMIT_S = 6 * 3600  # the whole ladder on 2 CPU cores, all invocations (sessions) together
QUICK_SPEC = UNetSpec(image_size=16, block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=4)
QUICK_SHAPE = {"max_count": 12, "alpha": 1.1, "min_count": 2}
# The rows of the report, in this order; the JSON keeps every metric.
REPORTED = ("accuracy", "grecall", "holdout_accuracy", "holdout_grecall", "prompt_fidelity", "copy_rate", "separability")


@dataclass(frozen=True)
class Prepared:
    """A training set read back from the stores, plus what evaluation needs."""

    data: TrainData
    real: RealSet  # the training images grouped by individual, for evaluation
    holdout: RealSet | None  # the held-out photos, grouped the same way
    counts: np.ndarray  # [C] training images per distinct caption (the neighbour graph's unit)
    source: str

    def caption_buckets(self, many_above: int, few_below: int) -> list[str]:
        """Each distinct caption's bucket: that of the individual it names (buckets are per individual)."""
        by_individual = assign_buckets(self.real.counts, many_above, few_below)
        of_caption = {self.real.captions[r]: by_individual[g] for r, g in enumerate(self.real.group)}
        return [of_caption[c] for c in self.data.captions]


def load_prepared(bench: Bench, home: Path, label: str, evaluate_cfg: EvaluateConfig) -> Prepared:
    """Read an ingested and indexed pipeline home as the train and evaluate tasks do."""
    from pogdiff.index import image_extractor
    from storage.settings import Settings
    from storage.training_set import load_holdout_set, load_real_set, load_training_set

    settings = Settings(home=home)
    column = evaluate_cfg.individual_column
    s = load_training_set(settings.dataset_uri, settings.lancedb_uri, image_extractor(bench.config.index).name, bench.size,
                          individual_column=column)
    graph = NeighbourGraph.build(*(torch.from_numpy(a) for a in (s.caption_of, s.nb_index, s.nb_sims, s.density, s.features)))
    data = TrainData(to_tensor(s.images), s.captions, graph, individual_ids(s.individuals))
    real = load_real_set(settings.dataset_uri, bench.size, column)
    holdout = load_holdout_set(settings.dataset_uri, bench.size, column)
    return Prepared(data, real, holdout, s.counts, label)


def demo_source(bench: Bench, variant: str, data_seed: int) -> Path:
    """The variant's data set of ``data_seed`` in its work folder (rewritten identically when it exists)."""
    v = VARIANTS[variant]
    source = bench.work(variant) / f"demo-{data_seed}"
    shape = QUICK_SHAPE if bench.quick and v.catalogue == "zipf" else {}
    folder.generate_longtail(source, seed=data_seed, size=bench.size, captions=v.captions, catalogue=v.catalogue, **shape)
    return source


def variant_config(config: RetrainConfig, variant: str) -> RetrainConfig:
    """``config`` with the variant's buckets."""
    v = VARIANTS[variant]
    if v.few_below is None:
        return config
    buckets = config.evaluate.buckets.model_copy(update={"few_below": v.few_below})
    return config.model_copy(update={"evaluate": config.evaluate.model_copy(update={"buckets": buckets})})


def prepare_test(bench: Bench, variant: str) -> Prepared:
    """Generate, ingest and index the test split into the variant's ``home-test`` (idempotent), read it back."""
    from storage import parquet
    from storage.settings import Settings
    from tasks.index import build_caption_index, build_image_features

    source = demo_source(bench, variant, SPLITS["test"]["data_seed"])
    home = bench.work(variant) / "home-test"
    settings = Settings(home=home)
    parquet.ingest(source, settings.dataset_uri, RetrainConfig().ingest, workers=1)
    build_caption_index(settings, bench.config.index)
    build_image_features(settings, bench.config.index)
    label = f"{variant}: demo data seed {SPLITS['test']['data_seed']}" + (" (quick)" if bench.quick else "")
    return load_prepared(bench, home, label, variant_config(bench.config, variant).evaluate)


def run_one(prep: Prepared, cfg: TrainConfig, eval_cfg: EvaluateConfig, work: Path, grid: Path | None = None) -> dict:
    """Fine-tune a fresh copy of ``cfg.base_model`` with ``cfg`` and evaluate it; returns metrics, per-individual
    rows, the exposure the sampling produced and training stats. ``grid``: write the held-out grid there."""
    pipe = load_pipeline(cfg.base_model)
    psi, active = [], []

    def on_step(step: int, m: dict[str, float]) -> None:
        psi.append(m.get("psi/mean", 0.0))
        active.append(m.get("psi/active_share", 0.0))

    started = time.perf_counter()
    train(pipe, prep.data, cfg, work, on_step=on_step, resume=False)
    trained = time.perf_counter() - started
    ev = evaluate(pipe, prep.real, eval_cfg, judge=detector.judge, holdout=prep.holdout, attributes=detector.attributes)
    for row, share in zip(ev.per_individual, neighbour_leakage(ev)):
        row["neighbour_leakage"] = share
    if grid is not None and prep.holdout is not None:
        write_bytes_atomic(grid, holdout_grid(prep.holdout, ev, f"held-out prompts: {grid.stem.rsplit('-', 1)[0]} "
                                                                f"({cfg.pog.method}, lam {cfg.pog.lam:g}, sampling {cfg.sampling})"))
    exposure = prep.data.exposure_summary(cfg, eval_cfg.buckets)
    return {
        "seed": cfg.seed,
        "metrics": ev.metrics,
        "per_individual": ev.per_individual,
        "exposure": exposure,
        "train_seconds": round(trained, 2),
        "eval_seconds": round(time.perf_counter() - started - trained, 2),
        "psi_mean": float(np.mean(psi)),
        "psi_active_share": float(np.mean(active)),
        "gate": ev.info["gate"],
    }


def neighbour_leakage(ev) -> list[float | None]:
    """Per individual of ``ev``: the share of its held-out-prompted images that show its family's best
    seller instead of it (a families variant drawn as the product it is named after: what borrowing from
    the neighbour risks); None for a product that is no variant, or without held-out images."""
    family = {p.name: p.family for p in catalogue.families_products() if p.family not in (None, p.name)}
    out: list[float | None] = []
    for row, samples in zip(ev.per_individual, ev.holdout_samples):
        name = row["individual"]
        if name not in family or len(samples) == 0:
            out.append(None)
            continue
        shown = detector.judge(samples, [name] * len(samples))
        out.append(None if shown is None else float(np.mean([s == family[name] for s in shown])))
    return out


def holdout_grid(holdout: RealSet, ev, title: str, rows: int = 12) -> bytes:
    """PNG: the held-out photo | the image generated from its caption, for the rarest individuals first."""
    from io import BytesIO

    from PIL import Image

    order = np.argsort([r["count"] for r in ev.per_individual], kind="stable")[:rows]
    labels, real, gen, caps = [], [], [], []
    for i in order:
        if len(ev.holdout_samples[i]) == 0:
            continue
        row = ev.per_individual[i]
        labels.append(f"{row['individual']}\n{row['count']} training photos")
        real.append(holdout.images[ev.holdout_sources[i]])
        gen.append(ev.holdout_samples[i])
        caps.append(ev.holdout_prompts[i])
    buffer = BytesIO()
    Image.fromarray(comparison_grid(labels, real, gen, caps, title, pairs=4)).save(buffer, format="PNG")
    return buffer.getvalue()


class Store:
    """Finished runs as JSON lines in ``work/results.jsonl``, keyed by what determines them."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: dict[str, dict] = {}
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    row = json.loads(line)
                    self.rows[row["key"]] = row

    @staticmethod
    def key(**what) -> str:
        return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:20]

    def get(self, key: str) -> dict | None:
        return self.rows.get(key)

    def put(self, key: str, row: dict) -> dict:
        row = {**row, "key": key}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:  # one line per run: a crash loses at most the run in flight
            f.write(json.dumps(row) + "\n")
        self.rows[key] = row
        return row


@dataclass(frozen=True)
class Bench:
    """What every phase of one invocation shares."""

    config: RetrainConfig  # index, train, evaluate and tune sections, with the invocation's overrides
    size: int  # the base model's image side
    quick: bool
    seeds: tuple[int, ...]
    taus: tuple[float, ...]  # CBDM's tau, swept on the validation split
    lams: tuple[float, ...]  # PoGDiff's lam on top of the tune's balancing, swept on the validation split
    store: Store
    work_root: Path  # scratch, a folder per variant
    state_root: Path  # what a rerun resumes from, a folder per variant (and the store)
    log: Callable[[str], None]
    prefect_api: str | None  # the Prefect server for `pogdiff tune`; None: an ephemeral one

    def work(self, variant: str) -> Path:
        """The variant's scratch folder (made when missing)."""
        folder = self.work_root / variant
        folder.mkdir(parents=True, exist_ok=True)
        return folder


def _clean_env(home: Path, prefect_api: str | None) -> dict[str, str]:
    """The environment of a ``pogdiff`` subprocess on its own home: local stores, no inherited servers
    but the Prefect server named by ``--prefect-api-url`` (else Prefect starts an ephemeral one)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POGDIFF_", "PREFECT_", "MLFLOW_"))}
    env = {**env, "POGDIFF_HOME": str(home), "HF_HUB_OFFLINE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    return {**env, "PREFECT_API_URL": prefect_api} if prefect_api else env


def _read_study(journal: Path) -> tuple[TrialResult, list[TrialResult]]:
    """The reference and the finished trials of the tune study in ``journal``."""
    from tasks.tune import finished_trials, load_study, reference_of

    study = load_study(journal)
    return reference_of(study), finished_trials(study)


def _run_tune(args: list[str], home: Path, kept: Path, log_file: Path, prefect_api: str | None) -> int:
    """``pogdiff tune`` on ``home``, its study journal copied to ``kept`` every few seconds (and seeded
    from it into a fresh home), so a benchmark stopped anywhere keeps the finished trials."""
    journals = home / STUDIES_DIR
    if kept.exists() and not any(journals.glob(f"*/{JOURNAL_FILE}")):
        (journals / kept.parent.name).mkdir(parents=True, exist_ok=True)
        (journals / kept.parent.name / JOURNAL_FILE).write_bytes(kept.read_bytes())

    def keep() -> None:
        found = list(journals.glob(f"*/{JOURNAL_FILE}"))
        if found:
            kept.parent.parent.mkdir(parents=True, exist_ok=True)
            target = kept.parent.parent / found[0].parent.name / JOURNAL_FILE
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{JOURNAL_FILE}.tmp")
            tmp.write_bytes(found[0].read_bytes())
            tmp.replace(target)

    with open(log_file, "a", encoding="utf-8") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=_clean_env(home, prefect_api), stdout=out,
                                stderr=subprocess.STDOUT)
        while True:
            try:
                proc.wait(timeout=5)
                break
            except subprocess.TimeoutExpired:
                keep()
    keep()
    return proc.returncode


def validate(bench: Bench, variant: str) -> dict:
    """Phase 1 on the validation split: ``pogdiff tune``, then CBDM's tau over ``bench.taus``. Returns
    what was chosen for each tuned method and why.

    The variant's work folder holds the scratch (data, stores); its state folder what a later
    invocation resumes from (tune.json, tuned.yaml, the study journal).
    """
    from tasks.tune import validation_evaluate

    config, store, log = variant_config(bench.config, variant), bench.store, bench.log
    work, state = bench.work(variant), bench.state_root / variant
    home = work / "home-validation"
    state.mkdir(parents=True, exist_ok=True)
    state_file = state / "tune.json"
    progress = json.loads(state_file.read_text()) if state_file.exists() else {"seconds": 0.0, "done": False}
    tuned_path = state / TUNED_FILE
    journal = next(iter(sorted((state / STUDIES_DIR).glob(f"*/{JOURNAL_FILE}"))), state / STUDIES_DIR / "pending" / JOURNAL_FILE)
    if not progress["done"]:
        source = demo_source(bench, variant, SPLITS["validation"]["data_seed"])
        cfg_path = work / "tune-config.yaml"
        cfg_path.write_text(yaml.safe_dump(config.model_dump(mode="json")), encoding="utf-8")
        log(f"{variant}: pogdiff tune on the validation split ({config.tune.trials} trials after the reference's "
            f"{config.tune.reference_seeds} seeds)")
        started = time.perf_counter()
        code = _run_tune(["tune", str(source), "--config", str(cfg_path), "--out", str(tuned_path)], home, journal, work / "tune.log", bench.prefect_api)
        progress["seconds"] += time.perf_counter() - started
        progress["done"] = code == 0
        state_file.write_text(json.dumps(progress))
        if code != 0:
            raise SystemExit(f"error: pogdiff tune failed (exit {code}); see {work / 'tune.log'}; a rerun resumes it")
        journal = next(iter(sorted((state / STUDIES_DIR).glob(f"*/{JOURNAL_FILE}"))))
    reference, trials = _read_study(journal)
    head = config.tune.head_max_drop
    chosen = choose(reference, trials, head)
    uniform = choose(reference, [t for t in trials if t.knobs.get("sampling", "uniform") == "uniform"], head)
    balanced = [t for t in trials if t.knobs.get("sampling", "uniform") != "uniform" and t.knobs["lam"] > 0
                and feasible(t.metrics, reference.metrics, head)]
    best_balanced = max(balanced, key=lambda t: t.score) if balanced else None

    eval_cfg = validation_evaluate(config)
    prepared: list[Prepared] = []  # the tune ingested and indexed the validation split into its home: read once, when needed

    def run(method: str, number: int, knobs: dict, cfg: TrainConfig) -> TrialResult:
        cfg = cfg.model_copy(update={"checkpoint_every": 10**9})
        key = Store.key(protocol=PROTOCOL, split="validation", variant=variant, train=cfg.model_dump(), evaluate=eval_cfg.model_dump())
        row = store.get(key)
        if row is None:
            if not prepared:
                prepared.append(load_prepared(bench, home, f"validation, {variant}", config.evaluate))
            row = store.put(key, {"split": "validation", "variant": variant, "method": method, **knobs,
                                  **run_one(prepared[0], cfg, eval_cfg, work / "scratch")})
            log(f"{variant}: validation {method} {knobs}: score {score(row['metrics']):.3f} (reference {reference.score:.3f})")
        return TrialResult(number, knobs, row["metrics"])

    # CBDM as published: uniform sampling, whatever the config's recipe balances (as its test runs)
    cbdm = [run("cbdm", i, {"cbdm_tau": tau},
                config.train.model_copy(update={"sampling": "uniform", "pog": PoGConfig(method="cbdm", cbdm_tau=tau)}))
            for i, tau in enumerate(bench.taus)]
    sweep = None
    if chosen.number >= 0 and chosen.knobs["lam"] == 0 and chosen.knobs.get("sampling", "uniform") != "uniform":
        from pogdiff.tune import trial_train

        lams = [run("pogdiff", i, {**chosen.knobs, "lam": lam}, trial_train(config.train, config.tune, {**chosen.knobs, "lam": lam}))
                for i, lam in enumerate(bench.lams)]
        ok = [t for t in lams if feasible(t.metrics, reference.metrics, head)]
        best = max(ok, key=lambda t: t.score) if ok else None
        sweep = {"balancing": chosen.knobs, "lams": {str(t.knobs["lam"]): {"score": t.score, "metrics": t.metrics} for t in lams},
                 "chosen_lam": None if best is None else best.knobs["lam"]}
    best_cbdm = choose(reference, cbdm, head)
    if best_cbdm is reference:  # CBDM must stay CBDM: its best tau by score when none beats the reference
        best_cbdm = max(cbdm, key=lambda t: t.score)
    trial = lambda t: {"trial": t.number, "knobs": t.knobs, "score": t.score}  # noqa: E731
    return {
        "tune": {"reference": {"metrics": reference.metrics, "score": reference.score, "seed_scores": list(reference.seed_scores),
                               "noise": reference.noise},
                 "trials": [{"number": t.number, "knobs": t.knobs, "metrics": t.metrics, "score": t.score} for t in trials],
                 "chosen": trial(chosen), "uniform_chosen": trial(uniform),
                 "best_balanced_borrowing": trial(best_balanced) if best_balanced else None,
                 "table": trials_table(reference, trials, chosen, head), "seconds": round(progress["seconds"], 1)},
        "cbdm": {"taus": {str(t.knobs["cbdm_tau"]): {"score": t.score, "metrics": t.metrics} for t in cbdm},
                 "chosen_tau": best_cbdm.knobs["cbdm_tau"]},
        "borrow_sweep": sweep,
    }


def method_configs(train_cfg: TrainConfig, tune_cfg, methods: tuple[str, ...], validation: dict | None) -> tuple[dict[str, TrainConfig], dict[str, str]]:
    """Each method's training (seed set per run) and a note per method where it is not what its name says."""
    from pogdiff.tune import trial_train

    def knobs(k: dict[str, Any], **over) -> TrainConfig:
        cfg = trial_train(train_cfg, tune_cfg, {**k, **{n: v for n, v in over.items() if n != "neighbour"}})
        cfg = cfg.model_copy(update={"steps": train_cfg.steps})
        if "neighbour" in over and cfg.pog.method == "pogdiff":
            cfg = cfg.model_copy(update={"pog": cfg.pog.model_copy(update={"neighbour": over["neighbour"]})})
        return cfg

    out = {"vanilla": knobs({"lam": 0.0}), "repeats": knobs({"lam": 0.0, "sampling": "repeats"}),
           "sqrt": knobs({"lam": 0.0, "sampling": "sqrt"})}
    notes: dict[str, str] = {}
    if validation is not None:
        tune = validation["tune"]
        out["cbdm"] = train_cfg.model_copy(update={"sampling": "uniform", "pog": PoGConfig(method="cbdm", cbdm_tau=validation["cbdm"]["chosen_tau"])})
        out["pogdiff_tuned"] = knobs(tune["uniform_chosen"]["knobs"])
        if tune["uniform_chosen"]["trial"] < 0:
            notes["pogdiff_tuned"] = ("no uniform-sampling trial beat the reference by more than the tune's noise: lam = 0, "
                                      "the same training as vanilla")
        sweep = validation["borrow_sweep"]
        if sweep is None or sweep["chosen_lam"] is None:
            for name in ("tuned_balancing", "tuned_balancing_pogdiff", "tuned_balancing_random", "tuned_balancing_self"):
                notes[name] = ("the tune chose no balancing alone" if sweep is None else "no lam of the sweep was feasible") + ": not run"
        else:
            out["tuned_balancing"] = knobs(sweep["balancing"])
            lam = {**sweep["balancing"], "lam": sweep["chosen_lam"]}
            out["tuned_balancing_pogdiff"] = knobs(lam)
            out["tuned_balancing_random"] = knobs(lam, neighbour="random")
            out["tuned_balancing_self"] = knobs(lam, neighbour="self")
        best = tune["best_balanced_borrowing"]
        if best is None:
            for name in ("balanced", "pogdiff_balanced", "random_neighbour", "self_target"):
                notes[name] = "the tune found no feasible trial that balances exposure and borrows: not run"
        else:
            out["balanced"] = knobs(best["knobs"], lam=0.0)
            out["pogdiff_balanced"] = knobs(best["knobs"])
            out["random_neighbour"] = knobs(best["knobs"], neighbour="random")
            out["self_target"] = knobs(best["knobs"], neighbour="self")
    return {m: out[m] for m in methods if m in out}, {m: n for m, n in notes.items() if m in methods}


def test_phase(bench: Bench, prep: Prepared, cfgs: dict[str, TrainConfig], variant: str) -> dict[str, list[dict]]:
    """Phase 2: every method x seed on the test split; returns per-seed rows per method."""
    config, store, log, work = variant_config(bench.config, variant), bench.store, bench.log, bench.work(variant)
    rows: dict[str, list[dict]] = {m: [] for m in cfgs}
    for name, base in cfgs.items():
        for seed in bench.seeds:
            cfg = base.model_copy(update={"seed": seed, "checkpoint_every": 10**9})
            eval_cfg = config.evaluate.model_copy(update={"seed": SPLITS["test"]["eval_seed"] + seed})
            key = Store.key(protocol=PROTOCOL, split="test", variant=variant, train=cfg.model_dump(), evaluate=eval_cfg.model_dump())
            row = store.get(key)
            if row is None:
                grid = work / "grids" / f"{name}-seed{seed}.png" if seed == bench.seeds[0] else None
                row = store.put(key, {"split": "test", "variant": variant, "method": name,
                                      **run_one(prep, cfg, eval_cfg, work / "scratch", grid)})
                m = row["metrics"]
                log(f"{variant}: {name} seed {seed}: few acc {m.get('few/accuracy', float('nan')):.3f} held-out "
                    f"{m.get('few/holdout_accuracy', float('nan')):.3f} copy {m.get('few/copy_rate', float('nan')):.3f} | "
                    f"many acc {m.get('many/accuracy', float('nan')):.3f} | train {row['train_seconds']:.0f} s, eval {row['eval_seconds']:.0f} s")
            rows[name].append(row)
    return rows


def diagnostics(prep: Prepared, buckets: list[str], cfgs: dict[str, TrainConfig]) -> dict:
    """How much psi borrows per bucket and timestep quartile (per PoGDiff config), and how alike the
    caption neighbours' images are: s_img per relation of two individuals (same individual, same
    colour, same shape, neither) and the share of top-k caption neighbours in each relation."""
    from pogdiff.pipelines.pixel import default_scheduler

    g = prep.data.graph
    steps = default_scheduler().config.num_train_timesteps
    out: dict = {"psi_by_bucket": {name: psi_by_bucket(g, buckets, cfg.pog, steps) for name, cfg in cfgs.items()
                                   if cfg.pog.method == "pogdiff"}}
    caps = prep.data.captions
    owner = {prep.real.captions[r]: int(i) for r, i in enumerate(prep.real.group)}
    individual_of = [owner[c] for c in caps]  # caption -> individual (a caption names one individual)
    looks = [catalogue.individual_named(n) for n in prep.real.names]
    if all(x is not None for x in looks):
        def relation(a: int, b: int) -> str:
            pa, pb = looks[a], looks[b]
            return ("same_individual" if a == b else "same_colour" if pa.colour == pb.colour
                    else "same_shape" if pa.shape == pb.shape else "unrelated")

        image_individual = torch.tensor(individual_of)[g.caption_of]
        pairs = {(a, b): relation(a, b) for a in range(len(looks)) for b in range(a, len(looks))}
        out["s_img_by_relation"] = demo_similarity_table(g.image_features, image_individual, pairs)
        k = PoGConfig().k
        kinds = [relation(individual_of[c], individual_of[j]) for c in range(len(caps)) for j in g.nb_ids[c, :k].tolist() if j >= 0]
        out["neighbour_relation_share"] = {r: kinds.count(r) / len(kinds) for r in
                                           ("same_individual", "same_colour", "same_shape", "unrelated")} if kinds else {}
    return out


def goals(agg: dict, variant: str) -> dict:
    """The issue's goals for one variant (pogdiff/longtail.py's checks, with the seed std as margin)."""
    out = {}
    if variant == "families" and {"pogdiff_balanced", "balanced"} <= set(agg):
        controls = tuple(c for c in ("random_neighbour", "self_target") if c in agg)
        out["method_claim"] = claim_check(agg, "pogdiff_balanced", "balanced", controls)
    if variant == "families" and {"tuned_balancing_pogdiff", "tuned_balancing"} <= set(agg):
        controls = tuple(c for c in ("tuned_balancing_random", "tuned_balancing_self") if c in agg)
        out["method_claim_on_the_tuned_balancing"] = claim_check(agg, "tuned_balancing_pogdiff", "tuned_balancing", controls)
    if {"pogdiff_tuned", "vanilla"} <= set(agg):
        out["tuned_no_harm"] = no_harm_check(agg, "pogdiff_tuned", "vanilla", (*BUCKETS, "overall"),
                                             ("accuracy", "grecall", "holdout_accuracy", "holdout_grecall"))
    if variant == "per-image" and "vanilla" in agg:
        for name in ("repeats", "sqrt"):
            if name in agg:
                out[f"exposure_{name}"] = claim_check(agg, name, "vanilla", (), metrics=("accuracy",), copy_metric=None)
    return out


def _bars(agg: dict, path: Path, title: str) -> None:
    """Identity accuracy on training and held-out prompts and copy rate per bucket, one bar per method, seed std as error bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from pogdiff.plots import save_png

    metrics = [m for m in ("accuracy", "holdout_accuracy", "copy_rate") if any(m in agg[x].get(b, {}) for x in agg for b in BUCKETS)]
    fig = Figure(figsize=(4.6 * len(metrics), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    groups = [b for b in (*BUCKETS, "overall") if any(b in agg[x] for x in agg)]
    width = 0.85 / len(agg)
    for ax, metric in zip(axes, metrics):
        for i, method in enumerate(agg):
            stats = [agg[method].get(g, {}).get(metric) for g in groups]
            xs = np.arange(len(groups)) + (i - (len(agg) - 1) / 2) * width
            ax.bar(xs, [s["mean"] if s else 0 for s in stats], width, yerr=[s["std"] if s else 0 for s in stats],
                   capsize=2, label=method)
        ax.set_xticks(np.arange(len(groups)), groups, fontsize=8)
        ax.set_title(f"{metric} ({'lower' if metric == 'copy_rate' else 'higher'} is better)", fontsize=10)
        ax.tick_params(labelsize=8)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    save_png(fig, path)


def _tradeoff(agg: dict, path: Path, title: str) -> None:
    """Where each method sits between generalising and copying: few-bucket held-out accuracy against copy rate."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from pogdiff.plots import save_png

    fig = Figure(figsize=(6.0, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for method, by_bucket in agg.items():
        x, y = by_bucket.get("few", {}).get("copy_rate"), by_bucket.get("few", {}).get("holdout_accuracy")
        if x is None or y is None:
            continue
        ax.errorbar(x["mean"], y["mean"], xerr=x["std"], yerr=y["std"], fmt="o", capsize=3, label=method)
        ax.annotate(method, (x["mean"], y["mean"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("few: copy rate (lower: fewer copies of a training photo)", fontsize=9)
    ax.set_ylabel("few: held-out accuracy (higher: the product in new scenes)", fontsize=9)
    ax.set_title(title, fontsize=10)
    ax.tick_params(labelsize=8)
    save_png(fig, path)


def _markdown(doc: dict) -> str:
    parts = [f"Long-tail ladder: {len(doc['seeds'])} seeds {doc['seeds']}, {doc['budget']['steps']} steps x batch "
             f"{doc['budget']['batch_size']}, lr {doc['budget']['learning_rate']:g}; mean ± std over seeds. Command: "
             f"`{doc['command']}`; compute {doc['runtime_s']:.0f} s over all invocations (limit {doc['limit_s']} s).\n"]
    for variant, v in doc["variants"].items():
        d = v["data"]
        parts.append(f"\n## {variant} ({v['data']['source']})\n\n{d['images']} training photos and {d['holdout']} held-out photos "
                     f"of {d['individuals']} products; buckets {d['buckets']} (many > {d['many_above']}, few < {d['few_below']}).\n\n")
        parts.append(markdown_table(v["results"], metrics=REPORTED))
        if v.get("roles"):
            parts.append("\nFew-bucket products by role (mean over the role's products, then ± std over seeds):\n\n" + v["roles"])
        exposure = [f"{m}: few {e['few']:.0f}, many {e['many']:.0f}" for m, e in v["exposure"].items() if e]
        if exposure:
            parts.append("\nExpected views per training photo over the run: " + "; ".join(exposure) + ".\n")
        for name, psi in v["diagnostics"]["psi_by_bucket"].items():
            cells = "; ".join(f"{b} {d['psi_mean']:.4f} (borrowing on {d['active_share']:.0%} of its samples)"
                              for b, d in psi.items() if b in BUCKETS)
            parts.append(f"\n{name}: mean psi per bucket, before caption dropout and over uniform draws: {cells}.\n")
        for name, note in v["notes"].items():
            parts.append(f"\n{name}: {note}.\n")
        if v.get("validation"):
            val = v["validation"]
            parts.append(f"\nValidation: `pogdiff tune` ({val['tune']['seconds']:.0f} s)\n\n" + val["tune"]["table"])
            taus = ", ".join(f"tau {t}: score {s['score']:.3f}" for t, s in val["cbdm"]["taus"].items())
            parts.append(f"\nCBDM on the validation split: {taus}; chosen tau {val['cbdm']['chosen_tau']}.\n")
            if val.get("borrow_sweep"):
                sw = val["borrow_sweep"]
                lams = ", ".join(f"lam {t}: score {r['score']:.3f}" for t, r in sw["lams"].items())
                parts.append(f"\nPoGDiff (default psi knobs) on top of the tune's balancing {sw['balancing']} on the validation "
                             f"split: {lams}; chosen lam {sw['chosen_lam']}.\n")
        for name, check in v["goals"].items():
            failed = [c for c in check["checks"] if not c["passed"]]
            parts.append(f"\nGoal {name}: {'met' if check['met'] else 'not met'}"
                         + (": " + "; ".join(f"{c.get('what', c.get('bucket', ''))} {c.get('difference', float('nan')):+.3f} "
                                             f"(margin {c.get('margin', float('nan')):.3f})" for c in failed) if failed else "") + ".\n")
    return "".join(parts)


def _exposure(rows: list[dict]) -> dict[str, float]:
    """Mean expected views per training photo of the few and many buckets over a method's seeds."""
    out = {}
    for bucket in ("few", "many"):
        values = [r["exposure"][f"{bucket}/views_per_image"] for r in rows if f"{bucket}/views_per_image" in r.get("exposure", {})]
        if values:
            out[bucket] = float(np.mean(values))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.longtail", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: tiny random base and data, 3 steps, one tune trial, seed 0")
    p.add_argument("--config", default=str(DEMO_CONFIG), help="retrain config YAML: its index, train, evaluate and tune sections")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(DEFAULT_VARIANTS))
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    p.add_argument("--trials", type=int, default=TUNE_TRIALS, help="pogdiff tune's searched trials per variant")
    p.add_argument("--state", default=str(STATE), help="what a rerun resumes from: finished runs, the tune studies and their choices")
    p.add_argument("--work", default=str(WORK), help="scratch: the data sets, the stores, the tune homes and the held-out grids")
    p.add_argument("--out", default=str(RESULTS), help="folder for the results files")
    p.add_argument("--prefect-api-url", help="Prefect server for the `pogdiff tune` subprocess (default: an ephemeral one)")
    args = p.parse_args(argv)
    started = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - started:6.0f} s] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    if len(set(args.seeds)) < len(args.seeds):
        raise SystemExit(f"error: --seeds has repeats: {args.seeds}")

    config = load_config(args.config)
    work_root = Path(args.work)
    data = config.model_dump(mode="json")
    data["train"]["checkpoint_every"] = 10**9
    data["tune"] = {**data["tune"], "trials": args.trials}
    if args.quick:
        from pogdiff.pipelines.pixel import PixelDiffusionPipeline

        base = work_root / "tiny-base"
        if not (base / META_FILE).exists():
            PixelDiffusionPipeline.new(QUICK_SPEC, seed=0).save_pretrained(base, extra={"method": "random"})
        data["train"].update({"base_model": str(base), "steps": 3, "batch_size": 8})
        data["index"]["image_feature_model"] = str(base)
        data["tune"].update({"trials": 1, "steps_per_trial": 3, "validation_images_per_individual": 2})
        data["evaluate"].update({"min_images_per_individual": 2, "max_images_per_individual": 2, "num_inference_steps": 2,
                                 "buckets": {"many_above": 5, "few_below": 3}})
        args.seeds = args.seeds[:1]
    config = parse_config(data)
    state_root = Path(args.state)
    bench = Bench(config=config, size=load_pipeline(config.train.base_model).image_size, quick=args.quick, seeds=tuple(args.seeds),
                  taus=QUICK_CBDM_TAUS if args.quick else CBDM_TAUS, lams=LAM_GRID[:1] if args.quick else LAM_GRID,
                  store=Store(state_root / "results.jsonl"),
                  work_root=work_root, state_root=state_root, log=log, prefect_api=args.prefect_api_url)
    methods = tuple(m for m in METHODS if m in args.methods)
    command = "python -m bench.longtail " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    every_method = set(methods) == set(METHODS)
    stem = "longtail" + ("" if every_method else "_" + "_".join(methods)) + (
        "" if set(args.variants) == set(DEFAULT_VARIANTS) else "_" + "_".join(args.variants))
    out = Path(args.out)

    variants = {}
    for variant in args.variants:
        vconfig = variant_config(config, variant)
        validation = validate(bench, variant) if NEEDS_VALIDATION & set(methods) else None
        prep = prepare_test(bench, variant)
        b = vconfig.evaluate.buckets
        buckets = prep.caption_buckets(b.many_above, b.few_below)
        individual_buckets = assign_buckets(prep.real.counts, b.many_above, b.few_below)
        log(f"{variant}: test data {len(prep.real.images)} images (+ {0 if prep.holdout is None else len(prep.holdout.images)} held out), "
            f"{len(prep.real.names)} individuals, {len(prep.counts)} captions")
        cfgs, notes = method_configs(vconfig.train, vconfig.tune, methods, validation)
        rows = test_phase(bench, prep, cfgs, variant)
        agg = aggregate({m: [r["metrics"] for r in rs] for m, rs in rows.items()})
        roles = None
        if VARIANTS[variant].catalogue == "families":
            role_of = {p.name: p.role for p in catalogue.families_products()}
            roles = role_table({m: [r["per_individual"] for r in rs] for m, rs in rows.items()}, role_of,
                               ("holdout_accuracy", "accuracy", "copy_rate", "neighbour_leakage"), bucket="few",
                               lower_better=frozenset({"neighbour_leakage"}))
        variants[variant] = {
            "data": {"source": prep.source, "images": int(len(prep.real.images)),
                     "holdout": 0 if prep.holdout is None else int(len(prep.holdout.images)), "grouped_by": prep.real.grouped_by,
                     "individuals": len(prep.real.names), "captions": int(len(prep.counts)),
                     "counts": dict(zip(prep.real.names, prep.real.counts.tolist())),
                     "buckets": {k: individual_buckets.count(k) for k in BUCKETS}, "many_above": b.many_above, "few_below": b.few_below},
            "validation": validation,
            "methods": {m: cfg.model_dump(include={"sampling", "max_repeats", "repeat_threshold", "pog"}) for m, cfg in cfgs.items()},
            "notes": notes,
            "results": agg,
            "roles": roles,
            "exposure": {m: _exposure(rs) for m, rs in rows.items()},
            "per_seed": rows,
            # a smoke run's figures are noise (tiny random base, 3 steps): no verdicts on them
            "goals": {} if args.quick else goals(agg, variant),
            "competence": competence_check(agg) if "vanilla" in agg and not args.quick else None,
            "diagnostics": diagnostics(prep, buckets, cfgs),
        }
        title = f"{prep.source}: {len(args.seeds)} seeds, {config.train.steps} steps, lr {config.train.learning_rate:g}"
        suffix = "" if every_method else "_" + "_".join(methods)
        _bars(agg, out / f"longtail_{variant}{suffix}.png", title)
        _tradeoff(agg, out / f"longtail_{variant}_tradeoff{suffix}.png", title)

    runtime = sum(r.get("train_seconds", 0) + r.get("eval_seconds", 0) for r in bench.store.rows.values()
                  if r.get("variant") in VARIANTS) + sum((v["validation"] or {}).get("tune", {}).get("seconds", 0) for v in variants.values())
    doc = {"bench": "longtail", "command": command.strip(), "runtime_s": round(runtime, 1), "limit_s": LIMIT_S,
           "wall_s_this_invocation": round(time.perf_counter() - started, 1), "smoke": args.quick, "seeds": list(args.seeds),
           "budget": {"steps": config.train.steps, "batch_size": config.train.batch_size, "learning_rate": config.train.learning_rate,
                      "base_model": "tiny random UNet (quick)" if args.quick else config.train.base_model,
                      "tune_trials": config.tune.trials, "cbdm_taus": list(bench.taus)},
           "evaluate": config.evaluate.model_dump() | {"seed": f"{SPLITS['test']['eval_seed']} + training seed"},
           "index": config.index.model_dump(), "splits": SPLITS,
           "machine": {"device": "cuda" if torch.cuda.is_available() else "cpu", "arch": platform.machine(),
                       "threads": torch.get_num_threads()},
           "variants": variants}
    write_bytes_atomic(out / f"{stem}.json", json.dumps(doc, indent=2).encode())
    write_bytes_atomic(out / f"{stem}.md", _markdown(doc).encode())
    summary = {v: {m: {k: agg_b.get("holdout_accuracy", agg_b.get("accuracy", {})).get("mean") for k, agg_b in d["results"][m].items()}
                   for m in d["results"]} for v, d in variants.items()}
    print(json.dumps({"bench": "longtail", "file": f"{stem}.json", "runtime_s": doc["runtime_s"], "limit_s": LIMIT_S,
                      "goals_met": {v: {g: chk["met"] for g, chk in d["goals"].items()} for v, d in variants.items()},
                      "holdout_accuracy": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
