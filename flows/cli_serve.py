"""``pogdiff serve``: run the deployments of prefect.yaml with their schedules, without a work pool."""

from __future__ import annotations

import typing

from pogdiff.config import EvaluateConfig, IndexConfig, TrainConfig
from storage.config import IngestConfig, RegisterConfig
from tasks.config import RetrainConfig, load_config

# A flow parameter of one of these types receives that section of a --config file.
_SECTIONS = {
    RetrainConfig: lambda c: c,
    IngestConfig: lambda c: c.ingest,
    IndexConfig: lambda c: c.index,
    TrainConfig: lambda c: c.train,
    EvaluateConfig: lambda c: c.evaluate,
    RegisterConfig: lambda c: c.registry,
}


def overrides(flow, source: str | None, config: RetrainConfig | None) -> dict:
    """The parameters of ``flow`` that ``--source`` and ``--config`` set."""
    hints = typing.get_type_hints(flow.fn)
    out = {}
    for name, hint in hints.items():
        if name == "source" and source is not None:
            out[name] = source
        elif config is not None and hint in _SECTIONS:
            out[name] = _SECTIONS[hint](config).model_dump(mode="json")
    return out


def cmd_serve(args, settings) -> int:
    from prefect import serve

    from flows.deployments import load_specs, to_runner_deployment

    specs = load_specs()
    known = {s.name for s in specs}
    unknown = sorted(set(args.deployment or []) - known)
    if unknown:
        raise FileNotFoundError(f"no deployment named {', '.join(unknown)} in prefect.yaml (have: {', '.join(sorted(known))})")
    # Deployments bound to another work pool (a GPU pool) run there, through `prefect deploy`.
    chosen = [s for s in specs if s.name in args.deployment] if args.deployment else [s for s in specs if s.work_pool in (None, "local")]
    config = load_config(args.config) if args.config else None
    deployments = [to_runner_deployment(s, overrides(s.flow(), args.source, config)) for s in chosen]
    if not settings.prefect_api_url:
        print("note: POGDIFF_PREFECT_API_URL is not set, so runs go to a temporary Prefect server that ends with this "
              "process; start `prefect server start` and point POGDIFF_PREFECT_API_URL at it to keep history and the UI.")
    print(f"serving {', '.join(s.name for s in chosen)} (Ctrl-C stops; schedules pause on stop)", flush=True)
    serve(*deployments, limit=args.limit)
    return 0


def add_commands(sub) -> None:
    s = sub.add_parser("serve", help="serve the prefect.yaml deployments with their schedules (no work pool needed)")
    s.add_argument("--deployment", action="append", help="serve only this deployment (repeatable; default: all on the local pool)")
    s.add_argument("--source", help="the source folder the deployments ingest (overrides prefect.yaml)")
    s.add_argument("--config", help="retrain config YAML; each deployment gets the sections its flow takes")
    s.add_argument("--limit", type=int, default=None, help="at most this many runs at once in this process")
    s.set_defaults(func=cmd_serve)
