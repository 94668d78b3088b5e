"""The retry policy of IO tasks (stores, files): a few tries with growing, jittered delays.

Compute tasks (train, evaluate's generation) are not retried: a retry would redo minutes of work,
and a crashed training resumes from its checkpoints on the next run instead.
"""

from __future__ import annotations

from prefect.tasks import exponential_backoff

from storage.settings import load_settings

# 3 retries after d, 2d and 4d s (each +-50%; d = settings' io_retry_delay_s, 2 s by default): rides
# out a store restarting, gives up within a minute. Read when the tasks are defined: Prefect fixes a
# task's retry delays in its decorator.
IO_RETRIES = {"retries": 3, "retry_delay_seconds": exponential_backoff(backoff_factor=load_settings().io_retry_delay_s),
              "retry_jitter_factor": 0.5}
