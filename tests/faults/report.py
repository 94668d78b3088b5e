"""Render the fault table of the Reliability page (docs/reliability.md, "The faults tried") from the rows
the fault tests recorded.

    POGDIFF_FAULT_RESULTS=faults.jsonl pytest tests/faults
    python -m tests.faults.report faults.jsonl        # markdown table on stdout
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def render(rows: list[dict]) -> str:
    lines = ["| fault | stage | observed outcome |", "|---|---|---|"]
    seen = set()
    for row in rows:
        key = (row["fault"], row["stage"])
        if key not in seen:  # a parametrized test records once per case; repeated runs append again
            seen.add(key)
            lines.append(f"| {row['fault']} | {row['stage']} | {row['outcome'].replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tests.faults.report RESULTS.jsonl", file=sys.stderr)
        return 2
    rows = [json.loads(line) for line in Path(argv[0]).read_text(encoding="utf-8").splitlines() if line.strip()]
    sys.stdout.write(render(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
