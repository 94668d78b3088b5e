"""What the ``pogdiff`` parser checks before any command runs: usage errors in one line, numbers in
their range, files and folders that must exist (or must not be the other kind), and every
subcommand's description and example.

The checks name the kind of thing they wanted ("file", "folder"), so ``--config configs`` says
that it got a folder instead of failing later inside YAML parsing.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors: ``error: pogdiff neighbours: argument -k: ... (see --help)``
    on stderr, exit 2. argparse's default prints the whole usage block first."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see `{self.prog} --help`)\n")


def command(sub, name: str, summary: str, example: str, details: str = "") -> Parser:
    """A subcommand with ``summary`` as its one-line help, ``summary`` (+ ``details``) as the
    description of its own ``--help``, and ``example`` (one shell line, or several) under it."""
    examples = "\n".join(f"  {line}" for line in example.splitlines())
    return sub.add_parser(name, help=summary, description=f"{summary[0].upper()}{summary[1:]}." + (f"\n\n{details}" if details else ""),
                          epilog=f"example:\n{examples}", formatter_class=argparse.RawDescriptionHelpFormatter)


def at_least(minimum: int) -> Callable[[str], int]:
    """Parser type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def existing_file(text: str) -> str:
    """Parser type: a file that exists (a folder is named as the wrong kind)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder, not a file")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"file not found: {text}")
    return text


def existing_folder(text: str) -> str:
    """Parser type: a folder that exists."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"folder not found: {text}")
    return text


def existing_path(text: str) -> str:
    """Parser type: a file or folder that exists (a source: a folder, a .parquet or a .tar file)."""
    if not Path(text).exists():
        raise argparse.ArgumentTypeError(f"no such file or folder: {text}")
    return text


def _room_for(path: Path, verb: str) -> None:
    """No file where one of ``path``'s parent folders has to be (missing parents are created)."""
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise argparse.ArgumentTypeError(f"cannot {verb} {path}: {parent} is a file, not a folder")


def output_file(text: str) -> str:
    """Parser type: where a file will be written: not an existing folder, nor under a file."""
    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name")
    _room_for(Path(text), "write")
    return text


def output_folder(text: str) -> str:
    """Parser type: a folder to write into: missing (it is created) or a folder, never a file."""
    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file; give a folder")
    _room_for(Path(text), "create")
    return text
