"""Run the `snncc` command in a child process, without paying for the interpreter's imports on
every call.

`python -m snncc ...` spends seconds importing torch and transformers before it reads its
arguments, and the tests call the CLI dozens of times. A forkserver process imports snncc's CLI
once; each `run_snncc` forks a fresh child from it that moves to its working folder, takes its
environment, sends its stdout and stderr to files and runs `snncc/__main__.py` as `python -m
snncc` does. The exit status, the output and the files left behind are those of a real run.

What only a fresh interpreter shows (bytes in argv, output printed while importing) is tested
with `run_fresh_snncc`.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path

TIMEOUT = 300
HELP_HINT = re.compile(r"Try 'snncc( [a-z]+)? -h' for help\.")  # click's hint, under a usage error's line
_PRELOAD = ["snncc.cli", "snncc.api", "transformers"]
_context = multiprocessing.get_context("forkserver")
_context.set_forkserver_preload(_PRELOAD)


def snncc_env(**extra: str) -> dict[str, str]:
    """The tests' environment for the CLI: offline (there is no model hub here)."""
    return dict(os.environ, HF_HUB_OFFLINE="1", **extra)


def _start_server() -> None:
    """Start the forkserver offline: the hub libraries read HF_HUB_OFFLINE when imported."""
    saved = dict(os.environ)
    os.environ.update(snncc_env())
    try:
        from multiprocessing import forkserver

        forkserver.ensure_running()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _child(args: list[str], cwd: str, env: dict[str, str], stdout: str, stderr: str) -> None:
    """In the forked child: be `python -m snncc ARGS` run in `cwd` with `env`."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, stdout), (2, stderr)):
        file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(file, fd)
        os.close(file)
    sys.argv = ["snncc", *args]
    runpy.run_module("snncc", run_name="__main__", alter_sys=True)


def run_snncc(cwd: Path, *args: str, env: dict[str, str] | None = None,
              timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """`python -m snncc ARGS` in `cwd` (offline unless `env` says otherwise), its output as text."""
    _start_server()
    with tempfile.TemporaryDirectory() as folder:
        stdout, stderr = Path(folder, "stdout"), Path(folder, "stderr")
        child = _context.Process(target=_child, args=(list(args), str(cwd), env or snncc_env(), str(stdout),
                                                      str(stderr)))
        child.start()
        child.join(timeout)
        if child.is_alive():
            child.kill()
            child.join()
            raise subprocess.TimeoutExpired(["snncc", *args], timeout)
        return subprocess.CompletedProcess(["snncc", *args], child.exitcode, stdout.read_text(),
                                           stderr.read_text())


def run_fresh_snncc(cwd: Path, *args: str | bytes, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """`python -m snncc ARGS` in a new interpreter: for what only a fresh start shows."""
    return subprocess.run([sys.executable, "-m", "snncc", *args], cwd=cwd, env=snncc_env(), capture_output=True,
                          text=True, timeout=timeout)
