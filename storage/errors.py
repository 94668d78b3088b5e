"""Errors a command reports in one line; kept free of heavy imports so the CLI can catch them cheaply."""

from __future__ import annotations


class RunNotFound(LookupError):
    """A reference names no run, model, alias or version in the tracking store."""
