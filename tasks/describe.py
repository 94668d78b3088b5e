"""The descriptions a reviewer reads in MLflow (markdown): of a retrain run, of its experiment, of the
registered model and of every version.

Written from what the run itself recorded (its tags, params and dataset inputs) and the promotion
decision, so a description never says more than the records do: the version's holds the gate
decision in one sentence, the bucket × metric table against the champion, the data the run read
with row counts, links (MLflow, the Prefect flow run, the dataset snapshot) and the metrics glossary.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from prefect import task

from pogdiff.glossary import OVERALL_VS_BUCKETS_SHORT, glossary_json, glossary_list, glossary_markdown
from pogdiff.tables import MISSING, markdown
from storage.config import GateConfig, RegisterConfig
from storage.dataset import manifest_path
from storage.links import has_scheme
from storage.mlflow import connection, descriptions, lineage, runs
from storage.settings import Settings
from tasks.report import bucket_table, champion_label, mlflow_links
from tasks.retry import IO_RETRIES

if TYPE_CHECKING:
    from tasks.results import Registration

PREFECT_FLOW_RUN_URL_TAG = "prefect_flow_run_url"  # the flow run in the Prefect UI (when its address is known)
GLOSSARY_ARTIFACT = "metrics_glossary"  # .json and .md at the root of every evaluated run's artifacts
EXPOSURE_TAG = "exposure"  # the train task's tag on the run: its sampling mode and the views per image it gave each bucket


def log_glossary(metrics: dict[str, float]) -> None:
    """Log what each of ``metrics`` means to the active run: ``metrics_glossary.json`` and ``.md``."""
    runs.log_text(glossary_json(metrics), f"{GLOSSARY_ARTIFACT}.json")
    runs.log_text(glossary_markdown(metrics), f"{GLOSSARY_ARTIFACT}.md")


def _link(text: str, url: str | None) -> str:
    return f"[{text}]({url})" if url else text


def _location_link(location: str | Path) -> str | None:
    """A URL for a store location: as it is when it has a scheme, a ``file://`` URL for an absolute path."""
    if has_scheme(location):
        return str(location)
    return Path(location).as_uri() if Path(location).is_absolute() else None


def run_facts(run_id: str) -> dict:
    """What a description of ``run_id`` says about it, read back from the run: ``run_id``, ``name``,
    ``model``, ``method``, ``base_model``, ``snapshot``, ``commit``, ``flow_run`` (id), ``flow_run_url``,
    ``exposure`` (the train task's ``EXPOSURE_TAG``, None before training) and ``inputs`` (``lineage.Input`` list)."""
    tags, params = runs.run_tags(run_id), runs.run_params(run_id)
    return {
        "run_id": run_id,
        "name": tags.get("mlflow.runName", run_id),
        "model": params.get("registry.model_name", MISSING),
        "method": tags.get("method", MISSING),
        "base_model": tags.get("base_model", MISSING),
        "snapshot": tags.get("dataset_snapshot_id", MISSING),
        "commit": tags.get("mlflow.source.git.commit"),
        "flow_run": tags.get("prefect_flow_run_id", "none"),
        "flow_run_url": tags.get(PREFECT_FLOW_RUN_URL_TAG),
        "exposure": tags.get(EXPOSURE_TAG),
        "inputs": lineage.run_inputs(run_id),
    }


def _summary(facts: dict) -> str:
    rows = next((i.rows for i in facts["inputs"] if i.name == f"dataset@{facts['snapshot']}"), None)
    flow_run = f"`{facts['flow_run']}`"
    flow = "outside Prefect" if facts["flow_run"] == "none" else f"by Prefect flow run {_link(flow_run, facts['flow_run_url'])}"
    commit = f" at commit `{facts['commit'][:12]}`" if facts["commit"] else ""
    exposure = f" Exposure: {facts['exposure']}." if facts.get("exposure") else ""
    return (f"Method `{facts['method']}` fine-tuned from `{facts['base_model']}` on dataset snapshot `{facts['snapshot']}`"
            f"{f' ({rows} rows)' if rows is not None else ''}, {flow}{commit}.{exposure}")


def _data(facts: dict, dataset_uri: str | Path) -> list[str]:
    # the link's text is the location's last part; the whole location is the link
    rows = [(f"`{i.name}`", i.context, MISSING if i.rows is None else str(i.rows),
             _link(f"`{i.source.rstrip('/').rsplit('/', 1)[-1]}`", _location_link(i.source))) for i in facts["inputs"]]
    manifest = manifest_path(dataset_uri, facts["snapshot"])
    return ["#### Data", "", f"Dataset snapshot `{facts['snapshot']}`: {_link('its manifest', _location_link(manifest))} "
            "lists the Parquet files it is made of.", "",
            *markdown(["input", "used for", "rows", "source"], rows, [False, False, True, False])]


def gate_sentence(decision: Registration) -> str:
    """The promotion decision of ``register_model`` in one sentence."""
    version, before = decision.version, decision.champion_before
    if before is None:
        which = "First version" if version == "1" else f"Version {version}"
        return (f"{which}: promoted to `champion` because there was no champion to compare with "
                "(the gate's checks show status `no-champion`).")
    if before == version:
        return f"Version {version} was already `champion`; nothing changed."
    if decision.promoted:
        return f"Promoted to `champion` over version {before}: the gate passed ({decision.reason})."
    return f"Stays `challenger`; version {before} remains `champion` because the gate failed: {decision.reason}."


def _outcome(decision: Registration, metrics: dict[str, float], links: dict[str, str | None]) -> list[str]:
    compare = f" {_link('Compare the runs in MLflow.', links['compare'])}" if links.get("compare") else ""
    return [f"**Gate decision.** {gate_sentence(decision)}{compare}", "",
            *bucket_table(metrics, decision.champion_metrics, champion_label(decision))]


def run_text(facts: dict, dataset_uri: str | Path, decision: Registration | None = None, metrics: dict[str, float] | None = None,
             links: dict[str, str | None] | None = None) -> str:
    """The run's description; with the ``decision`` and ``metrics`` once registered, without before."""
    links = links or {}
    registered = [] if decision is None else [
        f"Registered as {_link(decision.model_name + ' version ' + decision.version, links.get('version'))}.", "",
        *_outcome(decision, metrics or {}, links), ""]
    glossary = [] if not metrics else ["#### Metrics glossary", "", glossary_list(metrics)]
    return "\n".join([f"### Retrain of `{facts['model']}`", "", _summary(facts), "", *registered,
                      *_data(facts, dataset_uri), "", *glossary])


def version_text(facts: dict, dataset_uri: str | Path, decision: Registration, metrics: dict[str, float], links: dict[str, str | None]) -> str:
    """A version's description: what the gate decided and why, the table against the champion, links,
    the data and the glossary (cut from the end if MLflow's length limit needs it)."""
    return "\n".join([f"### {decision.model_name} version {decision.version}", "",
                      f"From run {_link('`' + facts['name'] + '`', links.get('run'))}. {_summary(facts)}", "",
                      *_outcome(decision, metrics, links), "", *_data(facts, dataset_uri), "",
                      "#### Metrics glossary", "",
                      glossary_list(metrics, f"{OVERALL_VS_BUCKETS_SHORT} The run's `{GLOSSARY_ARTIFACT}.md` says why.")])


def gate_rule(gate: GateConfig) -> str:
    """``registry.gate`` in words."""
    worse = f"{gate.max_worsening * 100:g} % of the champion's value" if gate.worsening == "relative" else f"{gate.max_worsening:g}"
    rules = [f"`{gate.metric}` {'gains' if gate.higher_is_better else 'falls by'} at least {gate.min_improvement:g}"]
    if gate.guard_metric:
        rules.append(f"`{gate.guard_metric}` worsens by at most {worse}")
    if gate.head_metric:
        rules.append(f"`{gate.head_metric}` drops by at most {gate.head_max_drop:g}")
    return ", ".join(rules[:-1]) + (" and " if len(rules) > 1 else "") + rules[-1]


def model_text(model_name: str, gate: GateConfig) -> str:
    """The registered model's description: what it is, what its aliases mean, how to load it."""
    return "\n".join([
        f"### {model_name}",
        "",
        "A text-to-image diffusion model fine-tuned by the PoGDiff pipeline's `retrain` flow; every retrain "
        "registers a version. Each version's description says what the promotion gate decided and why, with its "
        "metrics against the champion, the data it was trained on and links to its MLflow run and Prefect flow run.",
        "",
        "- `challenger`: the latest version.",
        f"- `champion`: the version in use. The gate promotes a new version when {gate_rule(gate)} "
        "(`registry.gate`); a reviewer can promote any version with `pogdiff promote VERSION`.",
        "",
        f'Load it: `mlflow.pyfunc.load_model("models:/{model_name}@champion").predict(pd.DataFrame({{"prompt": [...]}}))` '
        "returns uint8 images `[N, H, W, 3]`.",
    ]) + "\n"


def experiment_text(model_name: str) -> str:
    """The experiment's description: which runs it holds and what each one records."""
    return "\n".join([
        f"Runs of the PoGDiff pipeline for `{model_name}`: one run per retrain (`flows/retrain.py`: ingest, index, "
        "train, evaluate, register) and one per on-demand evaluation of a registered version (`flows/evaluate.py`, "
        "tag `kind=evaluation`).",
        "",
        "A retrain run records the resolved config (params and `config.json`), per-step training metrics (`train/*`), "
        "evaluation metrics per frequency bucket (`many/`, `medium/`, `few/`, `overall/`), the dataset snapshot and "
        "LanceDB table versions it read (dataset inputs, their row counts as `data/*/rows`), pictures and tables under "
        f"`eval/`, and `{GLOSSARY_ARTIFACT}.md`, which defines every metric and says which direction is better. Its "
        "description says what became of the model.",
    ]) + "\n"


def describe_run(settings: Settings, run_id: str, decision: Registration | None = None, metrics: dict[str, float] | None = None) -> None:
    """Write the run's description from its records (and the decision, once there is one)."""
    links = mlflow_links(settings.mlflow_ui_url, decision) if decision else {}
    descriptions.set_run_description(run_id, run_text(run_facts(run_id), settings.dataset_uri, decision, metrics, links))


@task(name="describe", **IO_RETRIES)
def describe_retrain(settings: Settings, cfg: RegisterConfig, metrics: dict[str, float], decision: Registration) -> None:
    """Describe the registered version and the run (replacing the run's first description), and
    the registered model if it has no description yet."""
    connection.use(settings)
    facts = run_facts(decision.run_id)
    links = mlflow_links(settings.mlflow_ui_url, decision)
    dataset = settings.dataset_uri
    descriptions.describe_version(cfg.model_name, decision.version, version_text(facts, dataset, decision, metrics, links))
    descriptions.set_run_description(decision.run_id, run_text(facts, dataset, decision, metrics, links))
    descriptions.describe_model_once(cfg.model_name, model_text(cfg.model_name, cfg.gate))
