"""A test hook that kills the process at a named point, so tests can show what a crash there leaves behind.

``DETOX_FAULT_POINT=NAME`` (or ``NAME:N``) sends the process SIGKILL the first (N-th) time it reaches
:func:`fault_point` ``NAME`` (the points: docs/security.md). Unset, a point costs one environment lookup.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "DETOX_FAULT_POINT"
_hits: Counter[str] = Counter()


def armed(name: str) -> bool:
    """True when this call is the one ``DETOX_FAULT_POINT`` names (counting this process's calls per name)."""
    spec = os.environ.get(ENV)
    if not spec:
        return False
    target, _, nth = spec.rpartition(":")
    if not nth.isdigit():  # point names may hold colons ("push:staged"); only a numeric suffix counts visits
        target, nth = spec, ""
    if target != name:
        return False
    _hits[name] += 1
    return _hits[name] == int(nth or 1)


def kill() -> None:
    """Die as ``kill -9`` would: no cleanup, no flushing of Python's buffers, no exit handlers."""
    os.kill(os.getpid(), signal.SIGKILL)


def fault_point(name: str) -> None:
    """Kill the process here if ``DETOX_FAULT_POINT`` names this point (and this is its N-th visit)."""
    if armed(name):
        kill()
