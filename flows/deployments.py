"""The deployments of prefect.yaml, as Python objects: one source of truth for `prefect deploy`
(work pools) and `pogdiff serve` (no work pool: runs in the serving process's machine).

`pogdiff serve` registers them under their own names (``NAME-served``), so on one Prefect server it
never overwrites a deployment `prefect deploy` made (whose pull steps a worker needs), and stopping it
pauses only its own schedules.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from storage.settings import REPO_ROOT

PREFECT_YAML = REPO_ROOT / "prefect.yaml"  # the local process pool's deployments
GPU_PREFECT_YAML = REPO_ROOT / "deploy" / "gpu" / "prefect.yaml"  # the Kubernetes GPU pool's, deployed on its own
SERVED_SUFFIX = "-served"


@dataclass(frozen=True)
class DeploymentSpec:
    name: str
    entrypoint: str  # "flows/retrain.py:retrain"
    parameters: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    schedule: dict[str, Any] | None = None  # {"cron": …, "timezone": …} or {"interval": seconds}
    concurrency_limit: int | None = None
    work_pool: str | None = None

    @property
    def served_name(self) -> str:
        """The name `pogdiff serve` registers this deployment under."""
        return self.name + SERVED_SUFFIX

    def flow(self):
        """The ``prefect.Flow`` the entrypoint names (imported as a module of this repository)."""
        path, name = self.entrypoint.split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        return getattr(module, name)


def load_specs(path: Path = PREFECT_YAML) -> list[DeploymentSpec]:
    spec = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    return [
        DeploymentSpec(
            name=d["name"],
            entrypoint=d["entrypoint"],
            parameters=d.get("parameters") or {},
            description=d.get("description", ""),
            schedule=d.get("schedule"),
            concurrency_limit=d.get("concurrency_limit"),
            work_pool=(d.get("work_pool") or {}).get("name"),
        )
        for d in spec["deployments"]
    ]


def to_runner_deployment(spec: DeploymentSpec, parameters: dict[str, Any] | None = None):
    """A ``RunnerDeployment`` for ``prefect.serve`` named ``spec.served_name``: schedule, concurrency
    limit and parameters (``parameters`` replace the spec's top-level keys they name)."""
    from prefect.schedules import Cron, Interval

    schedules = []
    if spec.schedule and "cron" in spec.schedule:
        schedules.append(Cron(spec.schedule["cron"], timezone=spec.schedule.get("timezone"), active=spec.schedule.get("active", True)))
    elif spec.schedule and "interval" in spec.schedule:
        schedules.append(Interval(spec.schedule["interval"], timezone=spec.schedule.get("timezone"), active=spec.schedule.get("active", True)))
    return spec.flow().to_deployment(
        name=spec.served_name,
        parameters={**spec.parameters, **(parameters or {})},
        description=spec.description,
        schedules=schedules or None,
        concurrency_limit=spec.concurrency_limit,
    )
