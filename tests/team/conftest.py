"""The team stack (tests/team/stack.py) as a fixture: up once per module that asks for it, and checked
to leave no process behind when it stops."""

from __future__ import annotations

import pytest
import stack


@pytest.fixture(scope="module")
def team_stack(tmp_path_factory):
    """The native team topology on loopback; skipped, saying why, where PostgreSQL's server cannot
    run (the S3 server is a pinned dev dependency, never a reason to skip). Its teardown fails the
    module's last test if a process of the stack outlives it."""
    reason = stack.unavailable()
    if reason:
        pytest.skip(reason)
    with stack.team_stack(tmp_path_factory.mktemp("team-stack")) as team:
        yield team
    left = team.leftovers()
    assert not left, f"processes of the team stack still alive after it stopped: {left}"
