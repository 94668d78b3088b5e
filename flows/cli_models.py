"""``pogdiff models`` and ``pogdiff promote``: the registered versions, and promotion by hand."""

from __future__ import annotations

import getpass
import json
import sys

from storage.config import RegisterConfig
from storage.settings import Settings
from tasks.config import load_config


def _registry(args) -> tuple[str, RegisterConfig]:
    """The model name (``--model``, else the config's ``registry.model_name``) and the registry config."""
    cfg = load_config(args.config).registry
    return args.model or cfg.model_name, cfg


def cmd_models(args, settings: Settings) -> int:
    from pogdiff.tables import MISSING, columns, fmt
    from storage.mlflow import connection, registry

    name, cfg = _registry(args)
    connection.connect(settings)
    versions = registry.list_versions(name)
    if args.json:
        print(json.dumps([{"model": name, **v} for v in versions], indent=2))
        return 0
    if not versions:
        print(f"{name}: no versions yet (`pogdiff demo` or `pogdiff retrain SOURCE` registers the first)")
        return 0
    keys = [k for k in (cfg.gate.metric, cfg.gate.guard_metric) if k]
    widths = [8, 22, 10, 10, *[-max(14, len(k) + 2) for k in keys], 0]  # a long key still leaves a gap
    print(f"{name}\n" + columns([("version", "aliases", "gate", "promoted", *keys, "  created")], widths)[0])
    for v in versions:
        gate = v["gate"]["decision"] if v["gate"] else MISSING
        cells = [v["version"], ",".join(v["aliases"]) or MISSING, gate, v["promoted_by"] or MISSING,
                 *(fmt(v["metrics"].get(k), ".4g") for k in keys), f"  {v['created']}"]
        print(columns([cells], widths)[0])
        if v["gate"]:
            print(f"{'':<8}gate: {v['gate']['reason']}")
        if v["promoted_by"] == "manual":
            print(f"{'':<8}promoted by hand by {v['promoted_by_user']} at {v['promoted_at']}")
    return 0


def _user() -> str | None:
    try:
        return getpass.getuser()  # $USER / $LOGNAME, else the account name
    except (KeyError, OSError):
        return None


def cmd_promote(args, settings: Settings) -> int:
    from storage.mlflow import connection, registry

    from storage.mlflow.references import resolve_version

    default, _ = _registry(args)
    connection.connect(settings)
    name, version = resolve_version(args.version, default)
    decision = registry.promote_manually(name, version, _user(), args.reason)
    if decision.champion_before == decision.version:
        print(f"{name} version {decision.version} is already champion; nothing changed")
    else:
        from tasks.register import keep_champion_lineage

        run_id = registry.version_run_id(name, decision.version)
        if run_id is not None and (problem := keep_champion_lineage(settings, name, run_id)):
            print(f"warning: the champion's data versions are not tagged ({problem})", file=sys.stderr)
        before = f"v{decision.champion_before}" if decision.champion_before else "none"
        print(f"{name} version {decision.version} -> champion (promoted by hand; champion before: {before}): {decision.reason}")
    return 0


def add_commands(sub) -> None:
    from flows.cli_args import command, existing_file

    config_help = "retrain config YAML whose 'registry' section applies (default: the built-in defaults, model pogdiff-demo)"
    m = command(sub, "models", "list the registered versions with aliases, gate decisions and key metrics", "pogdiff models --json")
    m.add_argument("--model", help="registered model name (default: the config's registry.model_name)")
    m.add_argument("--config", type=existing_file, help=config_help)
    m.add_argument("--json", action="store_true", help="print the versions as a JSON list (an empty registry: [])")
    m.set_defaults(func=cmd_models)

    p = command(sub, "promote", "make a version the champion by hand (recorded as a manual promotion)",
                'pogdiff promote challenger --reason "better on the rare products, checked by eye"')
    p.add_argument("version", help="a version number, challenger, champion, NAME@alias or NAME/version")
    p.add_argument("--reason", help="why (stored on the version as promotion_reason)")
    p.add_argument("--model", help="registered model name (default: the config's registry.model_name)")
    p.add_argument("--config", type=existing_file, help=config_help)
    p.set_defaults(func=cmd_promote)
