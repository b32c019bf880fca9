"""Atomic writes of files and directories: a reader never sees a half-written output.

A write goes to a temporary beside the target, named `.snncc-tmp-PID-RANDOM-NAME` (it ends
with the target's name, so writers that pick a format from the suffix still work), and is
renamed over the target only when the block ends without an error. The temporary is removed
on an exception and on SIGTERM or SIGINT; SIGKILL cannot be caught, so each write first
removes the temporaries of its own target that a dead process (or one older than
STALE_SECONDS, whose pid may have been reused) left behind.

A leaf module: it imports nothing from snncc, so any module may write atomically.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

TMP_PREFIX = ".snncc-tmp"
STALE_SECONDS = 3600
_SIGNALS = (signal.SIGTERM, signal.SIGINT)

_active: set[Path] = set()  # temporaries being written now, removed if a signal ends the process
_previous: dict[int, object] = {}  # the handlers ours replaced while _active is not empty


def temporary_name(target: Path) -> Path:
    """A fresh temporary path beside `target` that names this process."""
    return target.with_name(f"{TMP_PREFIX}-{os.getpid()}-{secrets.token_hex(4)}-{target.name}")


def _writer_pid(tmp: Path, target: Path) -> int | None:
    """The pid in a temporary's name if it is one of `target`'s, else None."""
    match = re.fullmatch(rf"{re.escape(TMP_PREFIX)}-(\d+)-[0-9a-f]+-{re.escape(target.name)}", tmp.name)
    return int(match.group(1)) if match else None


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale(target: Path) -> list[Path]:
    """Remove temporaries of `target` whose writer is gone (killed with SIGKILL, or the machine
    went down); a temporary of a live writer is left alone unless it is older than STALE_SECONDS.
    Returns what was removed."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in target.parent.iterdir():
            pid = _writer_pid(entry, target)
            if pid is None or pid == os.getpid():
                continue
            with contextlib.suppress(OSError):
                if not _running(pid) or time.time() - entry.lstat().st_mtime > STALE_SECONDS:
                    _remove(entry)
                    removed.append(entry)
    return removed


def _on_signal(signum: int, frame) -> None:
    """Remove every temporary being written, then do what the signal did before."""
    for tmp in list(_active):
        _remove(tmp)
    _active.clear()
    previous = _previous.get(signum, signal.SIG_DFL)
    _restore_handlers()
    if callable(previous):
        previous(signum, frame)  # Python's SIGINT handler raises KeyboardInterrupt here
    elif previous == signal.SIG_DFL:
        os.kill(os.getpid(), signum)  # the default action, now that ours is gone


def _install_handlers() -> None:
    if _previous or threading.current_thread() is not threading.main_thread():
        return  # already installed, or not allowed outside the main thread
    for signum in _SIGNALS:
        previous = signal.getsignal(signum)
        if previous in (signal.SIG_IGN, None):
            continue  # an ignored signal stays ignored; a handler set outside Python stays
        _previous[signum] = previous
        signal.signal(signum, _on_signal)


def _restore_handlers() -> None:
    for signum, previous in _previous.items():
        if signal.getsignal(signum) is _on_signal:
            signal.signal(signum, previous)
    _previous.clear()


@contextlib.contextmanager
def _registered(tmp: Path) -> Iterator[None]:
    """Keep `tmp` in the set a signal removes, with our handlers installed, for the block."""
    _active.add(tmp)
    _install_handlers()
    try:
        yield
    finally:
        _active.discard(tmp)
        if not _active and threading.current_thread() is threading.main_thread():
            _restore_handlers()  # (a worker thread may not; ours then only passes signals on)


def _fsync(path: Path, directory: bool = False) -> None:
    """Flush to disk, so that a crash after the rename cannot leave an empty target."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _temporary_beside(path: str | Path) -> tuple[Path, Path]:
    """The target as a Path (its folder created, stale temporaries of it removed) and a fresh
    temporary name beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    return path, temporary_name(path)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write; it replaces `path` only if the block ends
    without an error. It is created empty with the usual permissions (0666 less the umask)."""
    path, tmp = _temporary_beside(path)
    with _registered(tmp):
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            yield tmp
            commit_file(tmp, path)
        except BaseException:
            _remove(tmp)
            raise


def commit_file(tmp: Path, path: Path) -> None:
    """Move a finished temporary over `path`, durably (a file written elsewhere, such as a
    compile's artifact built in its parts folder, is committed the same way)."""
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent, directory=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path, keep_partial: bool = False) -> Iterator[Path]:
    """A temporary folder beside `path` to fill; when the block ends without an error its
    files move into `path` one atomic rename each (`path` is created if missing; files of
    `path` that the block did not write are kept), so no file in `path` is ever half-written.

    keep_partial: on an exception, still move in the files the block wrote before it (a debug
    dump of the passes before the one that failed is what the user needs); a signal drops them."""
    path, tmp = _temporary_beside(path)
    with _registered(tmp):
        try:
            tmp.mkdir()
            yield tmp
            _move_into(tmp, path)
        except Exception:
            if keep_partial:
                _move_into(tmp, path)
            raise
        finally:
            _remove(tmp)


def _move_into(source: Path, target: Path) -> None:
    if not target.exists():
        os.rename(source, target)
        return
    for entry in sorted(source.iterdir()):
        _fsync(entry)
        os.replace(entry, target / entry.name)
    _fsync(target, directory=True)


@contextlib.contextmanager
def scratch_dir(target: str | Path) -> Iterator[Path]:
    """A temporary folder beside `target` (named as its temporaries are, so a later write of
    `target` removes it if this process dies), for files that then move in with
    commit_together; removed when the block ends, and on SIGTERM or SIGINT."""
    _, tmp = _temporary_beside(target)
    with _registered(tmp):
        try:
            tmp.mkdir()
            yield tmp
        finally:
            _remove(tmp)


def commit_together(moves: list[tuple[Path, Path]]) -> None:
    """Move finished temporaries over their targets in order, all or nothing: each target's
    previous file is kept beside its temporary (a hard link, or a copy) until every move has
    succeeded, and on a failure each moved target is put back as it was (or removed, if it was
    new). A reader of the last target sees the others in place already."""
    kept: list[tuple[Path, Path | None]] = []
    try:
        for index, (tmp, target) in enumerate(moves):
            previous = None
            if target.exists() or target.is_symlink():
                previous = tmp.with_name(f"{TMP_PREFIX}-previous-{index}")
                try:
                    os.link(target, previous, follow_symlinks=False)
                except OSError:  # a file system without hard links: a copy keeps it just the same
                    shutil.copy2(target, previous, follow_symlinks=False)
            kept.append((target, previous))
            commit_file(tmp, target)
    except BaseException:
        for target, previous in reversed(kept):
            if previous is None:
                target.unlink(missing_ok=True)
            else:
                os.replace(previous, target)
        raise
    finally:
        for _, previous in kept:
            if previous is not None:
                previous.unlink(missing_ok=True)
