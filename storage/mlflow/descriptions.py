"""The descriptions a reviewer reads in the MLflow UI, in markdown: of a run, of an experiment, of a
registered model and of each of its versions.

Runs and experiments keep theirs in the tag ``mlflow.note.content`` (what the UI edits); registered
models and versions in their ``description`` field. Each store has a length limit; a longer text is
cut at a line end with a note saying so (``fit``), never refused.
"""

from __future__ import annotations

from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE
from mlflow.utils.validation import MAX_EXPERIMENT_TAG_VAL_LENGTH, MAX_TAG_VAL_LENGTH

from storage.mlflow.connection import experiment_id

# The SQL stores keep registered model and version descriptions in 5000-character columns
# (PostgreSQL refuses a longer one; SQLite would keep it).
REGISTRY_LIMIT = 5000
CUT_NOTE = "\n\n*(cut to MLflow's {limit}-character limit)*\n"


def fit(text: str, limit: int) -> str:
    """``text`` if it has at most ``limit`` characters, else its longest prefix that ends at a line
    end and leaves room for ``CUT_NOTE``, followed by the note."""
    if len(text) <= limit:
        return text
    note = CUT_NOTE.format(limit=limit)
    head = text[: limit - len(note)]
    return head[: head.rfind("\n") + 1 or len(head)].rstrip() + note


def set_run_description(run_id: str, text: str) -> None:
    """Replace the description of ``run_id``."""
    MlflowClient().set_tag(run_id, MLFLOW_RUN_NOTE, fit(text, MAX_TAG_VAL_LENGTH))


def describe_experiment_once(name: str, text: str) -> bool:
    """Give experiment ``name`` (created when missing) ``text`` as its description unless it has one
    (a reviewer's own edit is kept); returns whether it was set now."""
    client = MlflowClient()
    exp_id = experiment_id(name)
    if client.get_experiment(exp_id).tags.get(MLFLOW_RUN_NOTE):
        return False
    client.set_experiment_tag(exp_id, MLFLOW_RUN_NOTE, fit(text, MAX_EXPERIMENT_TAG_VAL_LENGTH))
    return True


def describe_model_once(name: str, text: str) -> bool:
    """Give registered model ``name`` ``text`` as its description unless it has one; returns whether
    it was set now."""
    client = MlflowClient()
    if client.get_registered_model(name).description:
        return False
    client.update_registered_model(name, description=fit(text, REGISTRY_LIMIT))
    return True


def describe_version(name: str, version: str, text: str) -> None:
    """Replace the description of ``version`` of registered model ``name``."""
    MlflowClient().update_model_version(name, str(version), description=fit(text, REGISTRY_LIMIT))
