"""What the property-based tests (``tests/test_fuzz_*.py``) share: each test's example budget, a
per-example timeout (a hang is a failure, not a stuck CI job), the count of examples each test ran
(printed at the end of the session by ``tests/conftest.py``) and the checks of the outcome every
property asks for: a correct result, or ONE ``error:`` line and exit code 2, and no partial file.

Budgets: ``fuzz(n)`` runs ``n`` examples under the default ``ci`` profile (``tests/conftest.py``:
``deadline=None``, derandomized so that a CI run is reproducible) and ``n * 20`` under
``--hypothesis-profile=long`` (random; for benchmarks and manual runs).
"""
from __future__ import annotations

import functools
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

from hypothesis import settings

#: the ``max_examples`` of the ``ci`` profile: a budget of ``n`` is ``n`` examples there
UNIT = 100

#: test name -> [examples run, seconds spent in them]
COUNTS: dict[str, list] = {}


class ExampleTimeout(Exception):
    """One example ran longer than its timeout (a hang)."""


def scaled(n: int) -> int:
    """``n`` examples in the ``ci`` profile, proportionally more in a longer one."""
    return max(1, round(n * settings.default.max_examples / UNIT))


def _alarm(seconds: float) -> Callable[[], None]:
    """Raise :class:`ExampleTimeout` in this (main) thread after ``seconds``; returns the cancel."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def ring(signum: int, frame: Any) -> None:
        raise ExampleTimeout(f"example still running after {seconds:g} s")

    old = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)

    def cancel() -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)

    return cancel


def fuzz(n: int, timeout: float = 30.0) -> Callable:
    """Decorator above ``@given``: ``n`` examples in CI (:func:`scaled`), each stopped after
    ``timeout`` seconds, counted in :data:`COUNTS` under the test's name."""

    def deco(test: Callable) -> Callable:
        inner = test.hypothesis.inner_test
        name = test.__name__

        @functools.wraps(inner)
        def counted(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            cancel = _alarm(timeout)
            try:
                return inner(*args, **kwargs)
            finally:
                cancel()
                entry = COUNTS.setdefault(name, [0, 0.0])
                entry[0] += 1
                entry[1] += time.perf_counter() - t0

        test.hypothesis.inner_test = counted
        return settings(max_examples=scaled(n))(test)

    return deco


# --------------------------------------------------------------------------------------------
# the outcome

def one_error_line(err: str) -> str:
    """The single ``error: ...`` line of a command's stderr (asserts there is nothing else: no
    traceback, no second line)."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one error line, got {len(lines)}:\n{err}"
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in err
    return lines[0]


def one_line(message: str) -> str:
    """A ``UserError`` message is one line (``UserError.__str__`` joins whitespace)."""
    assert message and "\n" not in message and "\r" not in message, repr(message)
    return message


def partial_files(folder: Path) -> list[str]:
    """Temporary or partial files under ``folder``: ``atomic_write_*``'s ``.<name>.<rand>.tmp``,
    the state export's ``.<name>.tmp<pid>``, a download's ``*.part``."""
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if ".tmp" in p.name or p.name.endswith(".part"))
