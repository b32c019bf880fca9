"""Progress on stderr for the long phases of a compile, a load or an export.

Every phase takes `progress: bool | None`: True shows it, False keeps quiet, None (the
default everywhere) shows it only where stderr is a terminal, so a piped or logged run stays
clean. Phases with countable steps (blocks, batches, tokens) get a tqdm bar (`bar`); a phase
without them (loading a model, tracing it, an ONNX export) gets a status line that ticks its
elapsed time while it runs and leaves one line saying how long it took (`phase`).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator

from tqdm import tqdm

# How often a phase's status line redraws its elapsed time.
_TICK_SECONDS = 1.0


def enabled(progress: bool | None) -> bool:
    """Whether to show progress: `progress` itself, or for None whether stderr is a terminal."""
    if progress is None:
        isatty = getattr(sys.stderr, "isatty", None)
        return bool(isatty is not None and isatty())
    return bool(progress)


def bar(iterable: Iterable | None = None, desc: str = "", progress: bool | None = None, total: int | None = None,
        unit: str = "it", leave: bool = False, **kwargs) -> tqdm:
    """A tqdm bar on stderr, shown where `enabled(progress)`."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, disable=not enabled(progress),
                file=sys.stderr, **_unsized(), **kwargs)


@contextlib.contextmanager
def phase(label: str, progress: bool | None, done: str | None = None) -> Iterator[None]:
    """Show "`label`… 12s" on stderr while the block runs, then "`done` in 12.3 s" (`done`
    defaults to "`label` done"); nothing where progress is off, and no closing line where the
    block fails (its error says what happened)."""
    if not enabled(progress):
        yield
        return
    start = time.perf_counter()
    status = tqdm(total=None, desc=f"{label}…", bar_format="{desc} {elapsed}", leave=False, file=sys.stderr,
                  **_unsized())
    stop = threading.Event()
    # A thread redraws the elapsed time: tqdm redraws only when a bar advances, and a phase has no steps.
    ticker = threading.Thread(target=_tick, args=(status, stop), daemon=True)
    ticker.start()
    try:
        yield
    finally:
        stop.set()
        ticker.join()
        status.close()
    tqdm.write(f"{done or label + ' done'} in {time.perf_counter() - start:.1f} s", file=sys.stderr)


def _unsized() -> dict:
    """No options (tqdm fits the terminal) unless stderr is a terminal that reports no size, as
    a pseudo-terminal never sized does (`script` in the background): tqdm would draw nothing
    in 0 columns and 0 rows, so it gets a size."""
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):  # not a terminal, or no file descriptor
        return {}
    return {} if size.columns > 0 and size.lines > 0 else {"ncols": 100, "nrows": 24}


def _tick(status: tqdm, stop: threading.Event) -> None:
    while not stop.wait(_TICK_SECONDS):
        status.refresh()
