"""Long Python work beside the requests of a serving worker: a snapshot build after an
activation, the business figures on a thread.

Such work runs in a thread, and the interpreter runs one thread at a time. Two things
keep it from holding up the requests:

- :func:`sharing_the_interpreter`: while inside, threads take turns every
  :data:`RELOAD_SWITCH_SECONDS` instead of every 5 ms, so a request waiting for the
  interpreter waits less at each of its turns.
- :func:`pace`: called between small steps of that work (a few thousand dicts made, a
  slice of an array listed), it rests the thread for :data:`PACE_REST_SECONDS` after
  each :data:`PACE_WORK_SECONDS` of work. Taking turns alone gives the work about half
  the interpreter whenever it has something to do, and a request beside it took about
  twice as long: an activation at a million customers (0.3-0.4 s of the build's Python)
  doubled the p99 of the seconds around it. Paced, the work takes at most about a third
  of the interpreter (a third of its wall time, of which it holds the interpreter about
  half) and lasts longer; requests meanwhile are slowed by a third, not doubled.
  Outside :func:`sharing_the_interpreter` (a worker starting, with no request to
  serve; the command line) it does nothing.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator

RELOAD_SWITCH_SECONDS = 0.0005
"""The interpreter's thread switch interval while a serving worker builds its next
snapshot. The build's Python work (the pitches of every distinct adoption sequence,
about 3 s at a million customers; re-reading changed customers) runs in a thread beside
the requests: at the default 5 ms a request waiting for the interpreter waited up to
5 ms at each of its turns, so its latency grew by tens of milliseconds for as long as
the build ran."""
PACE_WORK_SECONDS = 0.001
"""Wall time a paced thread works before it rests (see :func:`pace`)."""
PACE_REST_SECONDS = 0.002
"""How long a paced thread rests: the requests have the interpreter meanwhile."""

_sharing_lock = threading.Lock()
_sharing = 0  # threads inside sharing_the_interpreter
_switch_before = 0.0  # the interval the first of them found
_paced = threading.local()  # .since: when this thread last rested; absent: not paced


@contextlib.contextmanager
def sharing_the_interpreter(serving: bool = True) -> Iterator[None]:
    """While inside, with ``serving``, threads take turns every
    :data:`RELOAD_SWITCH_SECONDS`, and the calling thread is paced (:func:`pace`): for
    long Python work in a worker that serves (a snapshot build, the business figures).
    The interval is process-wide: the first thread in sets it and the last one out
    restores what the first found, so threads inside at once (a reload while the
    figures are computed) leave it as it was.
    """
    global _sharing, _switch_before
    if not serving:
        yield
        return
    with _sharing_lock:
        if _sharing == 0:
            _switch_before = sys.getswitchinterval()
            sys.setswitchinterval(min(_switch_before, RELOAD_SWITCH_SECONDS))
        _sharing += 1
    outer = getattr(_paced, "since", None)
    _paced.since = time.perf_counter()
    try:
        yield
    finally:
        if outer is None:
            del _paced.since
        with _sharing_lock:
            _sharing -= 1
            if _sharing == 0:
                sys.setswitchinterval(_switch_before)


def pace() -> None:
    """In a thread inside :func:`sharing_the_interpreter`: rest
    :data:`PACE_REST_SECONDS` once :data:`PACE_WORK_SECONDS` have passed since the last
    rest (a ``perf_counter`` call otherwise: call it between steps of tens of
    microseconds, not of nanoseconds). Elsewhere: nothing."""
    since = getattr(_paced, "since", None)
    if since is None:
        return
    if time.perf_counter() - since >= PACE_WORK_SECONDS:
        time.sleep(PACE_REST_SECONDS)
        _paced.since = time.perf_counter()
