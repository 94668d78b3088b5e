"""Every ``pogdiff`` command the README and the documentation site show in a code block parses with
today's parser, so a renamed command, option or choice cannot survive in the docs.

Synopsis lines (``pogdiff ingest SOURCE [--json] [--kind K]``) are checked with every optional
group in and each placeholder filled with something of its kind; the runbooks' commands run for
real in their own tests (tests/flows/test_scheduling.py).
"""

import re
import shlex
from pathlib import Path

import pytest

from flows.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
ENV = re.compile(r"^(?:export\s+)?(?:[A-Z_][A-Z0-9_]*=\S*\s+)*")


def documented() -> list[tuple[str, str]]:
    """``(page:line, command)`` for each line of a fenced block that runs ``pogdiff`` (after any
    ``VAR=value`` prefixes), without its trailing comment."""
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for block in FENCE.finditer(text):
            first = text[: block.start(1)].count("\n") + 1
            for n, line in enumerate(block.group(1).splitlines()):
                command = ENV.sub("", line.strip().removeprefix("$ "))
                command = re.split(r"\s+#\s", command, maxsplit=1)[0].strip()
                if command.startswith("pogdiff ") or command == "pogdiff":
                    found.append((f"{page.relative_to(ROOT)}:{first + n}", command))
    return found


def filled(command: str, tmp: Path) -> list[str]:
    """``command`` with every ``[optional]`` group in, the first of ``a|b`` choices, and each
    placeholder replaced by a value of its kind (files and folders that exist)."""
    (tmp / "src").mkdir(exist_ok=True)
    config = str(ROOT / "configs" / "demo.yaml")
    values = {"SOURCE": str(tmp / "src"), "FILE": config, "DIR": str(tmp / "src"), "OUT": str(tmp / "out"),
              "VERSION": "2", "MODEL": "champion", "N": "3", "K": "folder", "TEXT": "checked", "NAME": "retrain-nightly",
              "A": "champion", "B": "challenger", "CAPTION": "a red star", "REASON": "not_an_image"}
    command = command.replace("[", " ").replace("]", " ")
    command = re.sub(r"(\S+)\|\S+", r"\1", command)
    args = shlex.split(command)[1:]
    return [values.get(a.strip('"'), a) for a in args]


COMMANDS = documented()


def test_the_docs_show_commands():
    assert len(COMMANDS) >= 20, COMMANDS
    shown = {c.split()[1] for _, c in COMMANDS if len(c.split()) > 1}
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) <= shown, set(sub.choices) - shown


@pytest.mark.parametrize("where,command", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_a_documented_command_parses(where, command, tmp_path, capsys):
    try:
        build_parser().parse_args(filled(command, tmp_path))
    except SystemExit as stop:
        assert stop.code == 0, f"{where}: `{command}` does not parse: {capsys.readouterr().err.strip()}"
