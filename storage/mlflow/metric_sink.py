"""Per-step training metrics to MLflow without ever stalling training on the tracking server.

A training step must not wait for MLflow: with a synchronous ``log_metrics`` an outage blocks the
loop for MLflow's whole retry budget and then raises, and the run is lost with the server. The
sink queues every step's metrics in memory and a background thread writes them with
``log_batch``; a failed write is kept and retried with back-off (1 s doubling to ``max_backoff_s``) until the
server answers, so nothing is dropped and the steps arrive in order. ``close`` waits (up to its
deadline) until everything is written.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Mapping

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from storage.mlflow.runs import finite_metrics

log = logging.getLogger("pogdiff.tracking")

_BATCH = 500  # MLflow's log_batch accepts at most 1000 metrics per call


class MetricsNotWritten(RuntimeError):
    """The tracking server did not take the queued metrics before the close deadline."""


class MetricSink:
    """``sink.log(step, metrics)`` queues; a daemon thread writes to run ``run_id``. Use as a context
    manager or call ``close(timeout_s)``; ``written`` / ``pending`` count metric values."""

    def __init__(self, run_id: str, client: MlflowClient | None = None, max_backoff_s: float = 60.0):
        self.run_id = run_id
        self.max_backoff_s = max_backoff_s
        self.client = client or MlflowClient()
        self.written = 0
        self.failures = 0
        self._queue: deque[Metric] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=f"mlflow-metrics-{run_id[:8]}", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Queue one step's metrics (validated here: a NaN raises in the training loop, not later)."""
        now = int(time.time() * 1000)
        rows = [Metric(key, value, now, step) for key, value in finite_metrics(metrics).items()]
        with self._cond:
            self._queue.extend(rows)
            self._cond.notify()

    def _run(self) -> None:
        delay = 1.0
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                batch = [self._queue[i] for i in range(min(_BATCH, len(self._queue)))]
            try:
                self.client.log_batch(self.run_id, metrics=batch)
            except Exception as err:  # noqa: BLE001 - any failure of the server: keep the batch, retry
                self.failures += 1
                if self.failures == 1 or delay >= self.max_backoff_s:
                    log.warning("MLflow did not take %d queued metric values (%s); training goes on, retrying in %.0f s",
                                self.pending, str(err).splitlines()[0][:200], delay)
                time.sleep(delay)
                delay = min(delay * 2, self.max_backoff_s)
                continue
            delay = 1.0
            with self._cond:
                for _ in batch:
                    self._queue.popleft()
                self.written += len(batch)
                self._cond.notify_all()

    def close(self, timeout_s: float = 600.0) -> None:
        """Wait until every queued value is written; ``MetricsNotWritten`` after ``timeout_s``."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise MetricsNotWritten(f"MLflow did not take {self.pending} metric values of run {self.run_id} within "
                                    f"{timeout_s:.0f} s; the run is left RUNNING and the next retrain marks it FAILED")

    def __enter__(self) -> "MetricSink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
