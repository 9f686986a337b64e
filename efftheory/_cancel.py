"""Cooperative cancellation of long computations that run in threads of their own.

Whoever runs a computation in a thread (:mod:`efftheory.theory._schedule` runs the sources of the
next layers ahead) gives that thread a :class:`threading.Event` by :func:`cancel_with`; the
computation calls :func:`check_stop` between its kernel calls and blocks, which raises
:class:`Cancelled` once the event is set.  The flag lives here, apart from both the engine that
polls it and the scheduler that sets it.
"""

from __future__ import annotations

import contextvars
import threading

_STOP: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("efftheory_stop", default=None)


class Cancelled(Exception):
    """A computation stopped by its caller (:func:`check_stop`)."""


def cancel_with(event: threading.Event) -> None:
    """Make ``event`` this thread's (this context's) cancel flag."""
    _STOP.set(event)


def check_stop() -> None:
    """Raise :class:`Cancelled` when this context's cancel flag (:func:`cancel_with`) is set."""
    event = _STOP.get()
    if event is not None and event.is_set():
        raise Cancelled("cancelled by the caller")
