"""Atomic writes (snncc.atomic): no half-written target and no temporary left behind, on an
exception, on SIGTERM, and after a SIGKILL (cleaned by the next write)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from snncc.atomic import TMP_PREFIX, atomic_dir, atomic_file, temporary_name


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_the_target_appears_only_when_the_block_ends(tmp_path):
    target = tmp_path / "out.bin"
    with atomic_file(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(TMP_PREFIX) and tmp.name.endswith("out.bin")
        tmp.write_bytes(b"new")
        assert not target.exists()
    assert target.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["out.bin"]
    assert target.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_an_exception_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("failed while writing")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_a_dead_writers_temporary_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "out.bin"
    stale = target.with_name(f"{TMP_PREFIX}-{_dead_pid()}-0123abcd-out.bin")
    stale.write_bytes(b"left by a SIGKILL")
    live = temporary_name(target)  # this process is alive and its temporary recent: kept
    live.write_bytes(b"being written")
    other = tmp_path / f"{TMP_PREFIX}-{_dead_pid()}-0123abcd-other.bin"  # another target's: kept
    other.write_bytes(b"")
    with atomic_file(target) as tmp:
        tmp.write_bytes(b"new")
    assert sorted(os.listdir(tmp_path)) == sorted(["out.bin", live.name, other.name])


def test_an_old_temporary_is_removed_even_if_its_pid_runs(tmp_path):
    target = tmp_path / "out.bin"
    old = target.with_name(f"{TMP_PREFIX}-{os.getppid()}-0123abcd-out.bin")  # a live pid, reused
    old.write_bytes(b"")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    with atomic_file(target) as tmp:
        tmp.write_bytes(b"new")
    assert os.listdir(tmp_path) == ["out.bin"]


_WRITER = textwrap.dedent("""
    import signal
    import sys
    import time
    from pathlib import Path
    from snncc.atomic import atomic_file

    # Python's own SIGINT handler, even where the test runs with SIGINT ignored (a background
    # job of a non-interactive shell): a child inherits the ignored disposition and keeps it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with atomic_file(Path(sys.argv[1])) as tmp, open(tmp, "wb") as f:
        f.write(b"x" * 2**20)
        f.flush()
        print("writing", flush=True)
        while True:  # a big file being written until the signal comes
            f.write(b"x" * 2**16)
            time.sleep(0.001)
""")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_while_writing_leaves_no_temporary(tmp_path, signum):
    target = tmp_path / "big.bin"
    target.write_bytes(b"old")
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(target)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert writer.stdout.readline() == "writing\n", writer.stderr.read()
        writer.send_signal(signum)
        writer.wait(timeout=60)
    finally:
        writer.kill()
        writer.wait()
    if signum == signal.SIGTERM:
        assert writer.returncode == -signal.SIGTERM  # killed by it, as without the handler
    else:
        assert writer.returncode != 0 and "KeyboardInterrupt" in writer.stderr.read()
    assert os.listdir(tmp_path) == ["big.bin"] and target.read_bytes() == b"old"


def test_handlers_are_restored_after_the_write(tmp_path):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with atomic_file(tmp_path / "a") as tmp:
        assert signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM]
        with atomic_file(tmp_path / "b") as inner:  # nested writes share one installation
            inner.write_bytes(b"b")
        assert signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM]
        tmp.write_bytes(b"a")
    assert {s: signal.getsignal(s) for s in before} == before


def test_atomic_dir_moves_files_in_and_keeps_the_rest(tmp_path):
    target = tmp_path / "dump"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("1")
        assert not target.exists()
    assert sorted(os.listdir(target)) == ["a.txt"]
    (target / "mine.txt").write_text("user's")
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("2")
    assert (target / "a.txt").read_text() == "2" and (target / "mine.txt").read_text() == "user's"
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("failed")
    assert (target / "a.txt").read_text() == "2"
    assert os.listdir(tmp_path) == ["dump"]


def test_the_module_imports_nothing_from_snncc():
    source = (Path(__file__).parents[1] / "snncc" / "atomic.py").read_text()
    imports = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert imports and not [line for line in imports if "snncc" in line]


def test_atomic_dir_keep_partial_moves_in_what_was_written_before_the_error(tmp_path):
    target = tmp_path / "dump"
    with pytest.raises(RuntimeError), atomic_dir(target, keep_partial=True) as tmp:
        (tmp / "00_first_pass.txt").write_text("done")
        raise RuntimeError("the second pass failed")
    assert os.listdir(tmp_path) == ["dump"] and os.listdir(target) == ["00_first_pass.txt"]


def test_a_write_from_a_worker_thread_works_without_handlers(tmp_path):
    import threading

    errors = []

    def write():
        try:
            with atomic_file(tmp_path / "t.bin") as tmp:
                tmp.write_bytes(b"from a thread")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    worker = threading.Thread(target=write)
    worker.start()
    worker.join()
    assert not errors and (tmp_path / "t.bin").read_bytes() == b"from a thread"
