"""The retry policy of IO tasks (stores, files): a few tries with growing, jittered delays.

Compute tasks (train, evaluate's generation) are not retried: a retry would redo minutes of work,
and a crashed training resumes from its checkpoints on the next run instead.
"""

from __future__ import annotations

from prefect.tasks import exponential_backoff

# 3 retries after about 2, 4 and 8 s (each +-50%): rides out a store restarting, gives up within a minute
IO_RETRIES = {"retries": 3, "retry_delay_seconds": exponential_backoff(backoff_factor=2), "retry_jitter_factor": 0.5}
