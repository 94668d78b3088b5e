"""The task runner the flows map their shards over, chosen by settings (DESIGN §7)."""

from __future__ import annotations

from storage.settings import Settings, load_settings


def task_runner(settings: Settings | None = None):
    """``ThreadPoolTaskRunner`` (default) or ``DaskTaskRunner`` per ``settings.task_runner``."""
    settings = settings or load_settings()
    if settings.task_runner == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            raise ImportError("task_runner 'dask' needs the dask extra: pip install -e '.[dask]'") from None
        if settings.task_runner_address:
            return DaskTaskRunner(address=settings.task_runner_address)
        kwargs = {"n_workers": settings.task_runner_workers} if settings.task_runner_workers else {}
        return DaskTaskRunner(cluster_kwargs={"processes": True, **kwargs})
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=settings.task_runner_workers)
