"""An MLflow outage in the middle of training: a real `mlflow server` is stopped after step 3 and
started again (same store, same port) at step 12. Training never waits for it, every step's
metrics reach the run once the server is back, and the run ends FINISHED."""

from __future__ import annotations

import pytest
from faultkit import record
from localserver import free_port, healthy, start_mlflow_server, stop_server, wait_for
from mlflow.tracking import MlflowClient

from pogdiff.config import PoGConfig, TrainConfig
from pogdiff.demo import train_set
from pogdiff.pipelines.pixel import PixelDiffusionPipeline
from pogdiff.trainer import train
from storage.mlflow import connection, runs
from storage.mlflow.metric_sink import MetricSink

pytestmark = pytest.mark.slow  # servers, processes or whole flows: see pyproject's marker

STEPS, DOWN_AT, UP_AT = 20, 3, 12


def test_training_goes_on_through_an_mlflow_outage_and_no_metric_is_lost(tiny_spec, tmp_path, monkeypatch):
    # MLflow's own HTTP retries would only lengthen each failed attempt; the sink retries by itself
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    root = tmp_path / "mlflow"
    root.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(root, port)
    try:
        wait_for(lambda: healthy(url), 240, "the mlflow server", [server], interval=0.5, log=root / "server.log")
        connection.configure(url)
        run_id = runs.start("outage", run_name="train through an outage")
        sink = MetricSink(run_id, max_backoff_s=2.0)  # retry often: the test waits for the server's return
        queued_while_down = []

        def on_step(step: int, metrics: dict[str, float]) -> None:
            nonlocal server
            sink.log(step, {f"train/{k}": v for k, v in metrics.items()})
            if step == DOWN_AT:
                stop_server(server)
            elif DOWN_AT < step < UP_AT:
                queued_while_down.append(sink.pending)
            elif step == UP_AT:
                server = start_mlflow_server(root, port)  # not waited for: training goes on meanwhile

        data = train_set.train_data([6, 3, 2, 1], size=tiny_spec.image_size, k=2)
        cfg = TrainConfig(steps=STEPS, batch_size=4, checkpoint_every=100, pog=PoGConfig(method="pogdiff"))
        result = train(PixelDiffusionPipeline.new(tiny_spec, seed=0), data, cfg, tmp_path / "run", on_step=on_step)
        assert result.steps == STEPS
        assert queued_while_down and queued_while_down[-1] > 0  # metrics were held, not dropped, while it was down
        sink.close(timeout_s=300)
        assert sink.failures > 0 and sink.pending == 0
        history = MlflowClient().get_metric_history(run_id, "train/loss")
        assert sorted(m.step for m in history) == list(range(1, STEPS + 1))  # every step once, none lost
        runs.end(run_id, "FINISHED")
        assert MlflowClient().get_run(run_id).info.status == "FINISHED"
    finally:
        stop_server(server)
    record("MLflow tracking server stopped mid-training and started again (real `mlflow server`)", "train",
           f"training went on (steps queued while down, written with back-off once it returned); all {STEPS} steps "
           "of every metric in the run, run FINISHED")
