"""Wall-clock seconds per named phase of a training step, for the step-overhead bench.

The trainer and the methods wrap each phase in ``with phases("name"):``. By default they hold
``NO_PHASES``, whose phases are one shared ``nullcontext``: nothing is timed and nothing synchronised.
A ``PhaseTimer`` passed to ``train`` sums each phase's seconds instead. Phases may nest; a phase's
seconds exclude those of the phases inside it, so the sums add up to the time spent in all of them.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Iterator, Protocol

import torch

_NULL = nullcontext()


class Phases(Protocol):
    def __call__(self, name: str) -> AbstractContextManager: ...


class _NoPhases:
    def __call__(self, name: str) -> AbstractContextManager:
        return _NULL


NO_PHASES: Phases = _NoPhases()


class PhaseTimer:
    """``seconds[name]``: wall-clock seconds spent in phase ``name`` (its nested phases excluded), summed.

    On a CUDA machine every phase boundary synchronises the device, so a phase is charged with the
    kernels it launched rather than with those of the phase that first waits for them.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._inner: list[float] = []  # per open phase: seconds of the phases nested in it so far
        self._sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        self._inner.append(0.0)
        try:
            yield
        finally:
            self._sync()
            elapsed = time.perf_counter() - start
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed - self._inner.pop()
            if self._inner:
                self._inner[-1] += elapsed
