"""``pogdiff serve``: run the deployments of prefect.yaml with their schedules, without a work pool.

They are registered as ``NAME-served`` (flows/deployments.py), beside any deployment `prefect deploy`
made on the same server, which serve never changes or pauses.
"""

from __future__ import annotations

from pathlib import Path

from tasks.config import load_config


def overrides(flow, source: str | None, config: str | None) -> dict:
    """The parameters of ``flow`` that ``--source`` and ``--config`` (a config file path) set."""
    names = flow.parameters.properties
    out = {}
    if source is not None and "source" in names:
        out["source"] = source
    if config is not None and "config" in names:
        out["config"] = config
    return out


def _work_pool_deployments(specs) -> list[str]:
    """The work-pool deployments (from `prefect deploy`) of the served flows on this Prefect server
    whose schedules are on."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    flows = sorted({s.flow().name for s in specs})
    with get_client(sync_client=True) as client:
        found = client.read_deployments(flow_filter=FlowFilter(name=FlowFilterName(any_=flows)))
    return sorted(f"{d.name} (pool {d.work_pool_name})" for d in found
                  if d.work_pool_name and not d.paused and any(s.active for s in d.schedules))


def cmd_serve(args, settings) -> int:
    from prefect import serve

    from flows.deployments import load_specs, to_runner_deployment

    specs = load_specs()
    known = {s.name for s in specs}
    unknown = sorted(set(args.deployment or []) - known)
    if unknown:
        raise LookupError(f"no deployment named {', '.join(unknown)} in prefect.yaml (have: {', '.join(sorted(known))})")
    chosen = [s for s in specs if s.name in args.deployment] if args.deployment else specs
    config = None
    if args.config:
        load_config(args.config)  # a bad file stops here, in one line, not in every run
        config = str(Path(args.config).absolute())  # read again by each run: an edit applies to the next one
    source = str(Path(args.source).absolute()) if args.source else None
    deployments = [to_runner_deployment(s, overrides(s.flow(), source, config)) for s in chosen]
    if not settings.prefect_api_url:
        print("note: PREFECT_API_URL is not set, so runs go to a temporary Prefect server that ends with this "
              "process; start `prefect server start` and point PREFECT_API_URL at it to keep history and the UI.")
    elif pooled := _work_pool_deployments(chosen):
        # both paths on one server is allowed (they never touch each other's deployments), but then
        # both schedules fire and the two concurrency limits are separate: say so, so it is on purpose
        print(f"note: this Prefect server also schedules work-pool deployments of these flows: {', '.join(pooled)}. "
              "Their schedules fire through a worker as well as the served ones here, each under its own concurrency "
              "limit: serve only what the pool does not run (--deployment NAME), or pause one side's schedules "
              "(`prefect deployment schedule ls|pause`).")
    print(f"serving {', '.join(s.served_name for s in chosen)} (Ctrl-C stops; their schedules pause on stop)", flush=True)
    serve(*deployments, limit=args.limit)
    return 0


def add_commands(sub) -> None:
    from flows.cli_args import at_least, command, existing_file, existing_path

    s = command(sub, "serve", "serve the prefect.yaml deployments with their schedules (no work pool needed)",
                "PREFECT_API_URL=http://127.0.0.1:4200/api pogdiff serve --deployment retrain-nightly")
    s.add_argument("--deployment", action="append", help="serve only this deployment (repeatable; default: all in prefect.yaml)")
    s.add_argument("--source", type=existing_path, help="the source the deployments ingest (overrides prefect.yaml)")
    s.add_argument("--config", type=existing_file, help="retrain config YAML (overrides prefect.yaml's `config` of every deployment)")
    s.add_argument("--limit", type=at_least(1), default=None, help="at most this many runs at once in this process (default: no limit)")
    s.set_defaults(func=cmd_serve)
