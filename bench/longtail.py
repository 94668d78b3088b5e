"""The long-tail benchmark: plain fine-tuning vs CBDM vs PoGDiff (defaults) vs PoGDiff (tuned), on both caption variants.

    python -m bench.longtail                          # the reported run: both caption variants, seeds 0 1 2
    python -m bench.longtail --captions per-image     # one variant
    python -m bench.longtail --methods vanilla        # plain fine-tuning alone, with the competence check
    python -m bench.longtail --quick                  # smoke test: tiny base and data, 3 steps, one trial

Every method fine-tunes the same base with the config's train recipe (``--config``, default
configs/demo.yaml), on the same data order and evaluation seeds. Buckets, gRecall and accuracy are
per individual. The caption variants are the demo's two: ``per-image`` (each caption names the
product and describes its image, so a rare product's captions have neighbours showing the same
product) and ``individual`` (one caption per product, so every neighbour is another product).

Splits, fixed up front: *validation* = the demo data of data seed 1 (another rendering and another
rank order of the products), evaluated with the tune's ``eval_seed``; *test* = data seed 0 (the data
``pogdiff demo`` trains on), evaluation seeds 1234 + s. Per variant:

1. validation (only for the methods that need it): ``pogdiff tune`` itself (a subprocess on its own
   home in the work folder: Prefect, MLflow and the Optuna journal, as a user runs it) over psi's
   knobs, then CBDM's tau over CBDM_TAUS, chosen by the same score and feasibility rule
   (``pogdiff.tune.choose``) against the tune's lam = 0 reference;
2. test: every method x seed. ``pogdiff_tuned`` with lam = 0 chosen is plain fine-tuning, and its rows
   are vanilla's (same base, data order and seeds: the same training), said so in the JSON.

Each finished piece is kept in ``--state`` (default bench/results/longtail-state: the runs as JSON
lines, each variant's tune journal and chosen config) at once, so an interrupted run resumes where
it stopped, even in another checkout; ``--work`` (default var/bench/longtail) is scratch.
``runtime_s`` is the compute of all invocations together. Writes
(atomically) ``longtail.json`` (per variant: validation, method -> bucket -> metric -> mean, std,
per-seed values, the goals, the competence check, diagnostics), ``longtail.md`` and one plot per
variant in ``--out`` (default bench/results). Prints one JSON summary.
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

import numpy as np
import torch
import yaml

from pogdiff.atomic import write_bytes_atomic
from pogdiff.config import EvaluateConfig, PoGConfig, TrainConfig
from pogdiff.demo import catalogue, detector
from pogdiff.evaluation import RealSet, evaluate
from pogdiff.longtail import aggregate, competence_check, demo_similarity_table, goal_check, markdown_table, no_harm_check, psi_by_bucket
from pogdiff.metrics import BUCKETS, assign_buckets
from pogdiff.neighbours import NeighbourGraph
from pogdiff.pipelines.base import META_FILE, to_tensor
from pogdiff.pipelines.loader import load_pipeline
from pogdiff.pipelines.pixel import UNetSpec
from pogdiff.trainer import TrainData, train
from pogdiff.tune import JOURNAL_FILE, STUDIES_DIR, TUNED_FILE, TrialResult, choose, score, trials_table
from tasks.config import RetrainConfig, load_config, parse_config

REPO = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO / "configs" / "demo.yaml"  # index, train recipe and evaluate sections (judge, N, buckets)
RESULTS = Path(__file__).resolve().parent / "results"
WORK = REPO / "var" / "bench" / "longtail"  # scratch
STATE = RESULTS / "longtail-state"  # small, kept with the results, so a benchmark can span sessions

SEEDS = (0, 1, 2)
METHODS = ("vanilla", "cbdm", "pogdiff", "pogdiff_tuned")
NEEDS_VALIDATION = {"cbdm", "pogdiff_tuned"}
CBDM_TAUS = (0.1, 0.3, 1.0)  # the official default is 1.0
QUICK_CBDM_TAUS = (0.1, 1.0)  # a smoke run: two entries prove the sweep and the choice
TUNE_TRIALS = 6  # searched trials per variant after the lam = 0 reference: sized to the 2.5-hour budget on 2 cores
SPLITS = {"test": {"data_seed": 0, "eval_seed": 1234}, "validation": {"data_seed": 1}}
LIMIT_S = 9000  # the whole benchmark on 2 CPU cores, all invocations together
QUICK_SPEC = UNetSpec(image_size=16, block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=4)
QUICK_SHAPE = {"max_count": 12, "alpha": 1.1, "min_count": 2}


@dataclass(frozen=True)
class Prepared:
    """A training set read back from the stores, plus what evaluation needs."""

    data: TrainData
    real: RealSet  # the training images grouped by individual, for evaluation
    counts: np.ndarray  # [C] training images per distinct caption (the neighbour graph's unit)
    source: str

    def caption_buckets(self, many_above: int, few_below: int) -> list[str]:
        """Each distinct caption's bucket: that of the individual it names (buckets are per individual)."""
        by_individual = assign_buckets(self.real.counts, many_above, few_below)
        of_caption = {self.real.captions[r]: by_individual[g] for r, g in enumerate(self.real.group)}
        return [of_caption[c] for c in self.data.captions]


def load_prepared(bench: Bench, home: Path, label: str) -> Prepared:
    """Read an ingested and indexed pipeline home as the train task does (tasks/train.py)."""
    from pogdiff.index import image_extractor
    from storage.settings import Settings
    from storage.training_set import load_real_set, load_training_set

    settings = Settings(home=home)
    s = load_training_set(settings.dataset_uri, settings.lancedb_uri, image_extractor(bench.config.index).name, bench.size)
    graph = NeighbourGraph.build(*(torch.from_numpy(a) for a in (s.caption_of, s.nb_index, s.nb_sims, s.density, s.features)))
    data = TrainData(to_tensor(s.images), s.captions, graph)
    return Prepared(data, load_real_set(settings.dataset_uri, bench.size, bench.config.evaluate.individual_column), s.counts, label)


def demo_source(bench: Bench, captions: str, data_seed: int) -> Path:
    """The demo data set of ``data_seed`` in the variant's work folder (rewritten identically when it exists)."""
    source = bench.work(captions) / f"demo-{data_seed}"
    catalogue.generate_longtail(source, seed=data_seed, size=bench.size, captions=captions, **(QUICK_SHAPE if bench.quick else {}))
    return source


def prepare_test(bench: Bench, captions: str) -> Prepared:
    """Generate, ingest and index the test split into the variant's ``home-test`` (idempotent), read it back."""
    from storage import parquet
    from storage.settings import Settings
    from tasks.index import build_caption_index, build_image_features

    source = demo_source(bench, captions, SPLITS["test"]["data_seed"])
    home = bench.work(captions) / "home-test"
    settings = Settings(home=home)
    parquet.ingest(source, settings.dataset_uri, RetrainConfig().ingest, workers=1)
    build_caption_index(settings, bench.config.index)
    build_image_features(settings, bench.config.index)
    label = f"demo data seed {SPLITS['test']['data_seed']}, {captions} captions" + (" (quick)" if bench.quick else "")
    return load_prepared(bench, home, label)


def run_one(prep: Prepared, cfg: TrainConfig, eval_cfg: EvaluateConfig, work: Path) -> dict:
    """Fine-tune a fresh copy of ``cfg.base_model`` with ``cfg`` and evaluate it; returns metrics and training stats."""
    pipe = load_pipeline(cfg.base_model)
    psi, active = [], []

    def on_step(step: int, m: dict[str, float]) -> None:
        psi.append(m.get("psi/mean", 0.0))
        active.append(m.get("psi/active_share", 0.0))

    started = time.perf_counter()
    train(pipe, prep.data, cfg, work, on_step=on_step, resume=False)
    trained = time.perf_counter() - started
    ev = evaluate(pipe, prep.real, eval_cfg, judge=detector.judge)
    return {
        "seed": cfg.seed,
        "metrics": ev.metrics,
        "train_seconds": round(trained, 2),
        "eval_seconds": round(time.perf_counter() - started - trained, 2),
        "psi_mean": float(np.mean(psi)),
        "psi_active_share": float(np.mean(active)),
        "gate": ev.info["gate"],
    }


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
    store: Store
    work_root: Path  # scratch, a folder per caption variant
    state_root: Path  # what a rerun resumes from, a folder per caption variant (and the store)
    log: Callable[[str], None]
    prefect_api: str | None  # the Prefect server for `pogdiff tune`; None: an ephemeral one

    def work(self, captions: str) -> Path:
        """The caption variant's scratch folder (made when missing)."""
        folder = self.work_root / captions
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


def validate(bench: Bench, captions: str) -> dict:
    """Phase 1 on the validation split: ``pogdiff tune``, then CBDM's tau over ``bench.taus``. Returns
    what was chosen and why.

    The variant's work folder holds the scratch (data, stores); its state folder what a later
    invocation resumes from (tune.json, tuned.yaml, the study journal).
    """
    config, store, log = bench.config, bench.store, bench.log
    work, state = bench.work(captions), bench.state_root / captions
    home = work / "home-validation"
    state.mkdir(parents=True, exist_ok=True)
    state_file = state / "tune.json"
    progress = json.loads(state_file.read_text()) if state_file.exists() else {"seconds": 0.0, "done": False}
    tuned_path = state / TUNED_FILE
    journal = next(iter(sorted((state / STUDIES_DIR).glob(f"*/{JOURNAL_FILE}"))), state / STUDIES_DIR / "pending" / JOURNAL_FILE)
    if not progress["done"]:
        source = demo_source(bench, captions, SPLITS["validation"]["data_seed"])
        cfg_path = work / "tune-config.yaml"
        cfg_path.write_text(yaml.safe_dump(config.model_dump(mode="json")), encoding="utf-8")
        log(f"{captions}: pogdiff tune on the validation split ({config.tune.trials} trials after the lam = 0 reference)")
        started = time.perf_counter()
        code = _run_tune(["tune", str(source), "--config", str(cfg_path), "--out", str(tuned_path)], home, journal, work / "tune.log", bench.prefect_api)
        progress["seconds"] += time.perf_counter() - started
        progress["done"] = code == 0
        state_file.write_text(json.dumps(progress))
        if code != 0:
            raise SystemExit(f"error: pogdiff tune failed (exit {code}); see {work / 'tune.log'}; a rerun resumes it")
        journal = next(iter(sorted((state / STUDIES_DIR).glob(f"*/{JOURNAL_FILE}"))))
    reference, trials = _read_study(journal)
    tuned = load_config(tuned_path)
    chosen = choose(reference, trials, config.tune.head_max_drop)

    eval_cfg = config.evaluate.model_copy(update={"seed": config.tune.eval_seed})
    prep = None
    cbdm = []
    for tau in bench.taus:
        cfg = config.train.model_copy(update={"checkpoint_every": 10**9, "pog": PoGConfig(method="cbdm", cbdm_tau=tau)})
        key = Store.key(split="validation", captions=captions, train=cfg.model_dump(), evaluate=eval_cfg.model_dump())
        row = store.get(key)
        if row is None:
            if prep is None:  # the tune ingested and indexed the validation split into its home
                prep = load_prepared(bench, home, f"validation, {captions} captions")
            row = store.put(key, {"split": "validation", "captions": captions, "method": "cbdm", "cbdm_tau": tau,
                                  **run_one(prep, cfg, eval_cfg, work / "scratch")})
            log(f"{captions}: validation cbdm tau {tau}: score {score(row['metrics']):.3f} (lam = 0 reference {reference.score:.3f})")
        cbdm.append(TrialResult(len(cbdm), {"cbdm_tau": tau}, row["metrics"]))
    best_cbdm = choose(reference, cbdm, config.tune.head_max_drop)
    if best_cbdm is reference:  # CBDM must stay CBDM: its best tau by score when none beats the reference
        best_cbdm = max(cbdm, key=lambda t: t.score)
    return {
        "tune": {"reference": {"metrics": reference.metrics, "score": reference.score},
                 "trials": [{"number": t.number, "knobs": t.knobs, "metrics": t.metrics, "score": t.score} for t in trials],
                 "chosen": {"trial": chosen.number, "knobs": chosen.knobs, "score": chosen.score},
                 "pog": tuned.train.pog.model_dump(), "table": trials_table(reference, trials, chosen, config.tune.head_max_drop),
                 "seconds": round(progress["seconds"], 1)},
        "cbdm": {"taus": {str(t.knobs["cbdm_tau"]): {"score": t.score, "metrics": t.metrics} for t in cbdm},
                 "chosen_tau": best_cbdm.knobs["cbdm_tau"]},
    }


def method_pogs(methods: tuple[str, ...], validation: dict | None) -> dict[str, PoGConfig]:
    out = {"vanilla": PoGConfig(method="vanilla"), "pogdiff": PoGConfig(method="pogdiff")}
    if validation is not None:
        out["cbdm"] = PoGConfig(method="cbdm", cbdm_tau=validation["cbdm"]["chosen_tau"])
        out["pogdiff_tuned"] = PoGConfig.model_validate(validation["tune"]["pog"])
    return {m: out[m] for m in methods}


def test_phase(bench: Bench, prep: Prepared, pogs: dict[str, PoGConfig], captions: str) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """Phase 2: every method x seed on the test split; returns per-seed rows and notes per method."""
    config, store, log, work = bench.config, bench.store, bench.log, bench.work(captions)
    rows: dict[str, list[dict]] = {m: [] for m in pogs}
    notes: dict[str, str] = {}
    for name, pog in pogs.items():
        if name == "pogdiff_tuned" and pog.method == "vanilla" and "vanilla" in pogs:
            notes[name] = "the tune chose lam = 0 (plain fine-tuning): the same training as vanilla, so vanilla's rows"
            rows[name] = rows["vanilla"]
            continue
        for seed in bench.seeds:
            cfg = config.train.model_copy(update={"seed": seed, "checkpoint_every": 10**9, "pog": pog})
            eval_cfg = config.evaluate.model_copy(update={"seed": SPLITS["test"]["eval_seed"] + seed})
            key = Store.key(split="test", captions=captions, train=cfg.model_dump(), evaluate=eval_cfg.model_dump())
            row = store.get(key)
            if row is None:
                row = store.put(key, {"split": "test", "captions": captions, "method": name, **run_one(prep, cfg, eval_cfg, work / "scratch")})
                m = row["metrics"]
                log(f"{captions}: {name} seed {seed}: few gRecall {m.get('few/grecall', float('nan')):.3f} acc "
                    f"{m.get('few/accuracy', float('nan')):.3f} | many acc {m.get('many/accuracy', float('nan')):.3f} | "
                    f"train {row['train_seconds']:.0f} s, eval {row['eval_seconds']:.0f} s")
            rows[name].append(row)
    return rows, notes


def diagnostics(prep: Prepared, buckets: list[str], pogs: dict[str, PoGConfig]) -> dict:
    """How much psi borrows per bucket and timestep quartile (per PoGDiff config), and how alike the
    caption neighbours' images are: s_img per relation of two individuals (same individual, same
    colour, same shape, neither) and the share of top-k caption neighbours in each relation."""
    from pogdiff.pipelines.pixel import default_scheduler

    g = prep.data.graph
    steps = default_scheduler().config.num_train_timesteps
    out: dict = {"psi_by_bucket": {name: psi_by_bucket(g, buckets, pog, steps) for name, pog in pogs.items() if pog.method == "pogdiff"}}
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


def goals(agg: dict, captions: str) -> dict:
    """The issue's goals for one variant (pogdiff/longtail.py's checks, with the seed std as margin)."""
    out = {}
    if {"pogdiff_tuned", "vanilla", "cbdm"} <= set(agg) and captions == "per-image":
        out["tuned_beats_baselines"] = goal_check(agg, "pogdiff_tuned", ("vanilla", "cbdm"))
    if {"pogdiff_tuned", "vanilla"} <= set(agg) and captions == "individual":
        out["tuned_no_harm"] = no_harm_check(agg, "pogdiff_tuned", "vanilla", (*BUCKETS, "overall"), ("grecall", "accuracy"))
    if {"pogdiff", "vanilla"} <= set(agg):
        out["defaults_no_harm_on_many"] = no_harm_check(agg, "pogdiff", "vanilla", ("many",), ("accuracy",))
    return out



def plot(agg: dict, path: Path, title: str) -> None:
    """gRecall and identity accuracy per bucket, one bar per method, seed std as error bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from pogdiff.plots import save_png

    metrics = [m for m in ("grecall", "accuracy", "similarity") if any(m in agg[x].get(b, {}) for x in agg for b in BUCKETS)]
    fig = Figure(figsize=(4.0 * len(metrics), 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    groups = [b for b in (*BUCKETS, "overall") if any(b in agg[x] for x in agg)]
    width = 0.8 / len(agg)
    for ax, metric in zip(axes, metrics):
        for i, method in enumerate(agg):
            stats = [agg[method].get(g, {}).get(metric) for g in groups]
            xs = np.arange(len(groups)) + (i - (len(agg) - 1) / 2) * width
            ax.bar(xs, [s["mean"] if s else 0 for s in stats], width, yerr=[s["std"] if s else 0 for s in stats],
                   capsize=3, label=method)
        ax.set_xticks(np.arange(len(groups)), groups, fontsize=8)
        ax.set_title(f"{metric} (higher is better)", fontsize=10)
        ax.tick_params(labelsize=8)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    save_png(fig, path)


def _markdown(doc: dict) -> str:
    parts = [f"Long-tail benchmark: {len(doc['seeds'])} seeds {doc['seeds']}, {doc['budget']['steps']} steps x batch "
             f"{doc['budget']['batch_size']}, lr {doc['budget']['learning_rate']:g}; mean ± std over seeds. Command: "
             f"`{doc['command']}`; compute {doc['runtime_s']:.0f} s over all invocations (limit {doc['limit_s']} s).\n"]
    for captions, v in doc["variants"].items():
        parts.append(f"\n## {captions} captions ({v['data']['source']})\n\n" + markdown_table(v["results"]))
        for name, note in v["notes"].items():
            parts.append(f"\n{name}: {note}.\n")
        if v.get("validation"):
            val = v["validation"]
            parts.append(f"\nValidation: `pogdiff tune` ({val['tune']['seconds']:.0f} s)\n\n" + val["tune"]["table"])
            taus = ", ".join(f"tau {t}: score {s['score']:.3f}" for t, s in val["cbdm"]["taus"].items())
            parts.append(f"\nCBDM on the validation split: {taus}; chosen tau {val['cbdm']['chosen_tau']}.\n")
        for name, check in v["goals"].items():
            failed = [c for c in check["checks"] if not c["passed"]]
            parts.append(f"\nGoal {name}: {'met' if check['met'] else 'not met'}"
                         + (": " + "; ".join(f"{c['bucket']}/{c['metric']} vs {c['baseline']} {c.get('difference', float('nan')):+.3f} "
                                             f"(margin {c.get('margin', float('nan')):.3f})" for c in failed) if failed else "") + ".\n")
    return "".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.longtail", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: tiny random base and data, 3 steps, one tune trial, seed 0")
    p.add_argument("--config", default=str(DEMO_CONFIG), help="retrain config YAML: its index, train, evaluate and tune sections")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--captions", nargs="+", choices=catalogue.CAPTION_MODES, default=list(catalogue.CAPTION_MODES))
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    p.add_argument("--trials", type=int, default=TUNE_TRIALS, help="pogdiff tune's searched trials per variant")
    p.add_argument("--state", default=str(STATE), help="what a rerun resumes from: finished runs, the tune studies and their choices")
    p.add_argument("--work", default=str(WORK), help="scratch: the data sets, the stores and the tune homes")
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
        data["tune"].update({"trials": 1, "steps_per_trial": 3})
        data["evaluate"].update({"min_images_per_individual": 2, "max_images_per_individual": 2, "num_inference_steps": 2,
                                 "buckets": {"many_above": 5, "few_below": 3}})
        args.seeds = args.seeds[:1]
    config = parse_config(data)
    state_root = Path(args.state)
    bench = Bench(config=config, size=load_pipeline(config.train.base_model).image_size, quick=args.quick, seeds=tuple(args.seeds),
                  taus=QUICK_CBDM_TAUS if args.quick else CBDM_TAUS, store=Store(state_root / "results.jsonl"),
                  work_root=work_root, state_root=state_root, log=log, prefect_api=args.prefect_api_url)
    methods = tuple(m for m in METHODS if m in args.methods)
    command = "python -m bench.longtail " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))

    variants = {}
    for captions in args.captions:
        validation = validate(bench, captions) if NEEDS_VALIDATION & set(methods) else None
        prep = prepare_test(bench, captions)
        buckets = prep.caption_buckets(config.evaluate.buckets.many_above, config.evaluate.buckets.few_below)
        individual_buckets = assign_buckets(prep.real.counts, config.evaluate.buckets.many_above, config.evaluate.buckets.few_below)
        log(f"{captions}: test data {len(prep.real.images)} images, {len(prep.real.names)} individuals, {len(prep.counts)} captions")
        pogs = method_pogs(methods, validation)
        rows, notes = test_phase(bench, prep, pogs, captions)
        agg = aggregate({m: [r["metrics"] for r in rs] for m, rs in rows.items()})
        variants[captions] = {
            "data": {"source": prep.source, "images": int(len(prep.real.images)), "grouped_by": prep.real.grouped_by,
                     "individuals": len(prep.real.names), "captions": int(len(prep.counts)),
                     "counts": dict(zip(prep.real.names, prep.real.counts.tolist())),
                     "buckets": {b: individual_buckets.count(b) for b in BUCKETS}},
            "validation": validation,
            "methods": {m: pog.model_dump() for m, pog in pogs.items()},
            "notes": notes,
            "results": agg,
            "per_seed": rows,
            # a smoke run's figures are noise (tiny random base, 3 steps): no verdicts on them
            "goals": {} if args.quick else goals(agg, captions),
            "competence": competence_check(agg) if "vanilla" in agg and not args.quick else None,
            "diagnostics": diagnostics(prep, buckets, pogs),
        }
        plot(agg, Path(args.out) / f"longtail_{captions}{'' if set(methods) == set(METHODS) else '_' + '_'.join(methods)}.png",
             f"{prep.source}: {len(args.seeds)} seeds, {config.train.steps} steps, lr {config.train.learning_rate:g}")

    runtime = sum(r.get("train_seconds", 0) + r.get("eval_seconds", 0) for r in bench.store.rows.values()) + sum(
        (v["validation"] or {}).get("tune", {}).get("seconds", 0) for v in variants.values())
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
    stem = "longtail" if set(methods) == set(METHODS) and set(args.captions) == set(catalogue.CAPTION_MODES) else \
        f"longtail_{'_'.join(methods)}_{'_'.join(args.captions)}"
    out = Path(args.out)
    write_bytes_atomic(out / f"{stem}.json", json.dumps(doc, indent=2).encode())
    write_bytes_atomic(out / f"{stem}.md", _markdown(doc).encode())
    summary = {c: {m: {b: agg_b.get("accuracy", {}).get("mean") for b, agg_b in v["results"][m].items()} for m in v["results"]}
               for c, v in variants.items()}
    print(json.dumps({"bench": "longtail", "file": f"{stem}.json", "runtime_s": doc["runtime_s"], "limit_s": LIMIT_S,
                      "goals_met": {c: {g: chk["met"] for g, chk in v["goals"].items()} for c, v in variants.items()},
                      "accuracy": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
