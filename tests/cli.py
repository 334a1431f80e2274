"""Run a command-line entry point the way a user does, without paying for a new interpreter.

`run([sys.executable, "-m", "megavit.pretrain", ...])` and `run([sys.executable,
"tools/export_hf.py", ...])` fork this (test) process, which has torch, megavit and the data
libraries imported already, and in the child run the module or script as `__main__`, exactly
as `python -m MODULE` / `python SCRIPT` would (`runpy`, with `sys.argv`, the script's or the
working directory first on `sys.path`, the working directory and the environment set as for
that command). The child is a real process: its exit status, and everything written to file
descriptors 1 and 2, come back as a `subprocess.CompletedProcess`, so a test checks the
status, the messages and the files written as it would of a subprocess. What the child
changes (process groups, seeds, threads, the environment) ends with it.

The child starts as a fresh `python` would in what it can observe: stdin is /dev/null, the
warning filters are Python's defaults (pytest records warnings in-process; a CLI's warnings
must reach its stderr), the root logger has no handler, faulthandler is off, and it runs one
intra-op thread (`OMP_NUM_THREADS=1` is put in its environment: after a fork only one
thread exists, so the child must not use the parent's OpenMP pool).

`start(argv)` starts a command without waiting (`.wait()` gives its CompletedProcess), so
two independent runs can share the 2 cores: `run_parallel(start(a), start(b))`.

Imports are what a new interpreter spends its time on (torch, torch.distributed.checkpoint,
scikit-learn, torch._dynamo through the optimizer, transformers for the exports). `prewarm`
imports the common ones here once; and a child reports the modules it had to import, which
this process then imports, so the next child finds them loaded (and so do the gloo workers
that tests/harness.py forks). Neither changes what a child runs.

What this does not check is that an entry point imports cleanly in a new interpreter:
tests/test_tools.py::test_every_entry_point_starts_in_a_fresh_interpreter starts every tool
and entry point in one (with --help: their module-level imports), and the launcher,
quickstart and fault-tolerance tests run `python -m megavit.pretrain` /
`megavit.pretrain_contrastive` fresh under torchrun, mpiexec and bash, all the way. Anything
else (torchrun, mpiexec, bash, `python -c`, another interpreter) runs as a real subprocess.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Mapping, Sequence

ROOT = Path(__file__).resolve().parents[1]

# Python's default warning filters (-W / PYTHONWARNINGS unset), first match wins.
_DEFAULT_FILTERS = [("default", DeprecationWarning, "__main__"),
                    ("ignore", DeprecationWarning, ""),
                    ("ignore", PendingDeprecationWarning, ""),
                    ("ignore", ImportWarning, ""),
                    ("ignore", ResourceWarning, "")]


# Imported once, before the first fork (tests/conftest.py calls `prewarm` for the session).
PREWARM = ["torch.distributed.checkpoint", "torch._dynamo", "sklearn.datasets",
           "megavit.pretrain", "megavit.pretrain_contrastive", "megavit.run_entry",
           "megavit.tasks.classification", "megavit.tasks.image_text.task",
           "megavit.training.loop", "megavit.checkpointing.checkpointer",
           "megavit.checkpointing.offline", "megavit.data.image_text", "safetensors.torch"]
_learned: set[str] = set()


def prewarm(names: Sequence[str] = PREWARM) -> None:
    """Import `names` in this process (each once; one that fails to import is left to the
    child, which reports it as it would)."""
    import importlib

    for name in names:
        if name in _learned or name in sys.modules:
            continue
        _learned.add(name)
        try:
            importlib.import_module(name)
        except BaseException:        # noqa: BLE001 — e.g. an optional package missing
            pass


def _target(argv: Sequence[str]) -> tuple[str, str, list[str]] | None:
    """("module", name, args) or ("script", path, args) for `python -m NAME ...` /
    `python PATH.py ...` with this interpreter; None for anything else."""
    if len(argv) < 2 or str(argv[0]) != sys.executable:
        return None
    if argv[1] == "-m" and len(argv) > 2:
        return "module", str(argv[2]), [str(a) for a in argv[3:]]
    if str(argv[1]).endswith(".py") and not str(argv[1]).startswith("-"):
        return "script", str(argv[1]), [str(a) for a in argv[2:]]
    return None


def _report_imports(before: set[str], fd: int) -> None:
    """Write the names of the modules this child imported (not its __main__) to fd."""
    new = [m for m in list(sys.modules) if m not in before and not m.startswith("__")]
    os.write(fd, "\n".join(new).encode())


def _child(kind: str, name: str, args: list[str], env: Mapping[str, str], cwd: str | None,
           out_fd: int, err_fd: int) -> int:
    import faulthandler
    import logging
    import runpy
    import warnings

    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
    unbuffered = bool(env.get("PYTHONUNBUFFERED"))
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=unbuffered)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True,
                                  errors="backslashreplace")
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr
    faulthandler.disable()
    if cwd is not None:
        os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)

    warnings.resetwarnings()
    for action, category, module in reversed(_DEFAULT_FILTERS):
        warnings.filterwarnings(action, category=category, module=module)

    def show(msg) -> None:      # warnings._showwarnmsg_impl, which pytest replaces
        file = msg.file if msg.file is not None else sys.stderr
        if file is not None:
            try:
                file.write(warnings._formatwarnmsg(msg))
            except OSError:
                pass
    warnings._showwarnmsg_impl = show
    warnings.showwarning = warnings._showwarning_orig
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)

    import torch

    torch.set_num_threads(1)
    if kind == "module":
        sys.argv = [name, *args]      # runpy puts the module's path in argv[0]
        sys.path.insert(0, os.getcwd())       # as `python -m` does
        runpy.run_module(name, run_name="__main__", alter_sys=True)
    else:
        path = os.path.abspath(name)
        sys.argv = [name, *args]
        sys.path.insert(0, os.path.dirname(path))   # as `python SCRIPT` does
        runpy.run_path(path, run_name="__main__")
    return 0


def _exit_status(code) -> int:
    """What `sys.exit(code)` makes the process's exit status."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


class Started:
    """A started command: `wait()` gives its CompletedProcess."""

    def __init__(self, argv: Sequence[str], env: dict[str, str], cwd, timeout: float) -> None:
        self.argv = list(map(str, argv))
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None
        target = _target(argv)
        if target is None:
            self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
            return
        env["OMP_NUM_THREADS"] = "1"
        kind, name, args = target
        prewarm()
        self.files = [tempfile.TemporaryFile() for _ in range(3)]   # stdout, stderr, imports
        out, err, imports = (f.fileno() for f in self.files)
        before = set(sys.modules)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:                                   # the child: never returns
            status = 1
            try:
                status = _child(kind, name, args, env, None if cwd is None else str(cwd),
                                out, err)
            except SystemExit as e:
                status = _exit_status(e.code)
            except BaseException:                      # as the interpreter reports it
                import traceback

                traceback.print_exc()
                status = 1
            finally:
                try:
                    _report_imports(before, imports)
                except BaseException:                   # noqa: BLE001 — exiting anyway
                    pass
                for stream in (sys.stdout, sys.stderr):
                    try:
                        stream.flush()
                    except BaseException:               # noqa: BLE001 — exiting anyway
                        pass
                os._exit(status)
        self.pid = pid

    def wait(self) -> subprocess.CompletedProcess:
        if self.proc is not None:
            try:
                out, err = self.proc.communicate(
                    timeout=max(0.0, self.deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate()
                raise
            return subprocess.CompletedProcess(self.argv, self.proc.returncode, out, err)
        delay = 0.001
        while True:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > self.deadline:
                os.kill(self.pid, 9)
                os.waitpid(self.pid, 0)
                raise subprocess.TimeoutExpired(self.argv, self.timeout)
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        out, err, imports = self.files
        try:
            imports.seek(0)
            prewarm([m for m in imports.read().decode().split("\n") if m])
            out.seek(0)
            err.seek(0)
            return subprocess.CompletedProcess(self.argv, os.waitstatus_to_exitcode(status),
                                               _text(out.read()), _text(err.read()))
        finally:
            for f in self.files:
                f.close()


def start(argv: Sequence[str], *, env: Mapping[str, str] | None = None,
          cwd: str | os.PathLike | None = None, timeout: float = 300,
          capture_output: bool = True, text: bool = True) -> Started:
    """Start `argv` as `run` does, without waiting: `.wait()` gives the CompletedProcess."""
    assert capture_output and text, "tests.cli always captures text output"
    return Started(argv, dict(os.environ if env is None else env), cwd, timeout)


def run(argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd,
    timeout=timeout), forked from this process for `python -m MODULE` / `python SCRIPT`
    (see the module's docstring); a real subprocess for anything else."""
    return start(argv, **kwargs).wait()


def run_parallel(*started: Started) -> list[subprocess.CompletedProcess]:
    """Wait for commands started side by side (independent ones: 2 cores, one thread each)."""
    return [s.wait() for s in started]


def _text(data: bytes) -> str:
    """As `subprocess.run(text=True)` decodes (universal newlines)."""
    return data.decode(errors="replace").replace("\r\n", "\n").replace("\r", "\n")
