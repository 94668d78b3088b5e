"""Two promotions racing in two real processes against one real MLflow store: the nightly gate
decides first but its alias write lands last (a slow network, injected as a wait before that one
call until the reviewer's promotion has finished); a reviewer's manual promotion decides in between. The champion ends on the later decision,
and both decisions are recorded on their versions."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest
from faultkit import ROOT, base_env, record
from mlflow.tracking import MlflowClient

from storage.mlflow import connection

pytestmark = pytest.mark.slow  # servers, processes or whole flows: see pyproject's marker

MODEL = "race"

_GATE = """
    import sys, time
    from mlflow.tracking import MlflowClient
    from storage.config import GateConfig
    from storage.mlflow import connection, registry
    connection.configure(sys.argv[1])
    real = MlflowClient.set_registered_model_alias
    def slow(self, name, alias, version):
        if alias == "champion" and not getattr(slow, "done", False):
            slow.done = True
            open(sys.argv[2], "w").close()  # the decision is recorded: let the reviewer go
            deadline = time.monotonic() + 120
            while not __import__("os").path.exists(sys.argv[3]) and time.monotonic() < deadline:
                time.sleep(0.05)  # the gate's own alias write arrives after the reviewer's promotion
        return real(self, name, alias, version)
    MlflowClient.set_registered_model_alias = slow
    print(registry.promote("race", "2", {"few/grecall": 0.5}, GateConfig(metric="few/grecall")).promoted)
"""

_MANUAL = """
    import sys
    from storage.mlflow import connection, registry
    connection.configure(sys.argv[1])
    print(registry.promote_manually("race", "3", "reviewer", "hotfix").promoted)
"""


def _start(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT, env=base_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_racing_promotions_end_on_the_later_decision_with_both_recorded(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    connection.configure(uri)
    client = MlflowClient()
    client.create_registered_model(MODEL)
    for _ in range(3):
        client.create_model_version(MODEL, source=str(tmp_path / "weights"))

    decided, go = tmp_path / "gate-decided", tmp_path / "reviewer-done"
    gate = _start(_GATE, uri, str(decided), str(go))
    deadline = time.monotonic() + 120
    while not decided.exists():
        assert gate.poll() is None and time.monotonic() < deadline, gate.communicate()
        time.sleep(0.05)
    manual = _start(_MANUAL, uri)
    out, err = manual.communicate(timeout=120)
    assert manual.returncode == 0 and out.strip() == "True", err[-3000:]
    assert str(client.get_registered_model(MODEL).aliases["champion"]) == "3"
    go.touch()
    out, err = gate.communicate(timeout=120)
    assert gate.returncode == 0 and out.strip() == "True", err[-3000:]

    versions = {str(mv.version): mv.tags for mv in client.search_model_versions(f"name = '{MODEL}'")}
    assert versions["2"]["gate.decision"] == "promoted" and versions["2"]["promoted_by"] == "gate"
    assert versions["3"]["promoted_by"] == "manual" and versions["3"]["promoted_by_user"] == "reviewer"
    assert versions["2"]["promoted_at"] < versions["3"]["promoted_at"]
    assert str(client.get_registered_model(MODEL).aliases["champion"]) == "3"  # the later decision, not the last write
    record("two promotions racing in two processes (the gate's alias write delayed past a reviewer's promotion)",
           "register", "champion ends on the later decision (after every alias move the latest `promoted_at` wins); both decisions recorded")
