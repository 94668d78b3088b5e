"""The retry policy of IO tasks (stores, files): a few tries with growing, jittered delays, for
errors that waiting can heal. Bad input (a missing or unreadable source, a bad config) fails at once.

Compute tasks (train, evaluate's generation) are not retried: a retry would redo minutes of work,
and a crashed training resumes from its checkpoints on the next run instead.
"""

from __future__ import annotations

from prefect.tasks import exponential_backoff

from pogdiff.config import ConfigError
from storage.items import SourceError
from storage.settings import load_settings

PERMANENT = (SourceError, ConfigError)  # the input is wrong: a retry would fail the same way, later


def transient(task, task_run, state) -> bool:
    """Prefect's retry condition: retry unless the task failed on bad input (``PERMANENT``)."""
    error = state.data
    if not isinstance(error, BaseException):
        try:
            error = state.result(raise_on_failure=False)
        except Exception:  # noqa: BLE001 - the failure cannot be read back: keep the default, retry
            return True
    return not isinstance(error, PERMANENT)


# 3 retries after d, 2d and 4d s (each +-50%; d = settings' io_retry_delay_s, 2 s by default): rides
# out a store restarting, gives up within a minute. Read when the tasks are defined: Prefect fixes a
# task's retry delays in its decorator.
IO_RETRIES = {"retries": 3, "retry_delay_seconds": exponential_backoff(backoff_factor=load_settings().io_retry_delay_s),
              "retry_jitter_factor": 0.5, "retry_condition_fn": transient}
