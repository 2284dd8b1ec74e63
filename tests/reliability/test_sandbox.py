"""Promise: a model-written program cannot touch anything outside its own folder. Each hostile
program below passes only if its attack worked; each is stopped, and the files, secrets, server and
processes the test sets up around it are as they were. A correct HumanEval solution still passes
and a wrong one fails, as under the runner before bubblewrap. Where no sandbox can start, no program
runs: evaluate skips the code cells with the reason, and scores every other cell."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stages.common import sandbox
from stages.common.config import Paths, load_section
from stages.common.sandbox import BWRAP, UNSAFE, SandboxUnavailable, run_program
from stages.common.tracking import flatten_numbers
from stages.evaluate import EvaluateConfig, run
from tests.conftest import ROOT, tiny_config, tiny_params

TASK_DIR = ROOT / "configs/lm_eval"
NO_SANDBOX = sandbox.unavailable()
needs_sandbox = pytest.mark.skipif(NO_SANDBOX is not None, reason=f"no sandbox here: {NO_SANDBOX}")


def humaneval_utils():
    spec = importlib.util.spec_from_file_location("humaneval_utils", TASK_DIR / "humaneval_utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    return utils


def humaneval(n: int) -> list[dict]:
    lines = (ROOT / "assets/lm_eval/humaneval.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines[:n]]


# ---------------------------------------------------------------------------------------------
# what a program is for: pass when right, fail when wrong, stop when it runs away


@needs_sandbox
def test_a_correct_program_passes_and_a_wrong_one_fails() -> None:
    assert run_program("assert sum([1, 2]) == 3").outcome == "passed"
    failed = run_program("assert sum([1, 2]) == 4")
    assert not failed.passed and failed.outcome == "failed" and "AssertionError" in failed.detail


@needs_sandbox
def test_humaneval_outcomes_are_those_of_the_runner_before_bubblewrap() -> None:
    """Reference solutions pass, wrong ones fail, a loop times out: under bubblewrap and under the
    old runner (now `unsafe_no_sandbox`) alike. (bench/sandbox_bench.py does all 164 problems.)"""
    utils = humaneval_utils()
    problems = humaneval(3)
    cases = [(doc, kind, completion) for doc in problems
             for kind, completion in (("reference", doc["canonical_solution"]), ("wrong", "    return None\n"))]
    cases.append((problems[0], "loop", "    while True:\n        pass\n"))
    for doc, kind, completion in cases:
        program = utils.program(doc, completion)
        timeout = 1.0 if kind == "loop" else utils.TIMEOUT_S
        results = {box: run_program(program, timeout=timeout, sandbox=box) for box in (BWRAP, UNSAFE)}
        assert results[BWRAP].passed == (kind == "reference"), (doc["task_id"], kind, results)
        assert results[BWRAP].outcome == results[UNSAFE].outcome, (doc["task_id"], kind, results)
    # and through the task's own hook, as lm-eval calls it
    assert utils.process_results(problems[0], [problems[0]["canonical_solution"]]) == {"pass@1": 1.0}
    assert utils.process_results(problems[0], ["    return None\n"]) == {"pass@1": 0.0}


@needs_sandbox
def test_sleeping_forever_is_stopped_and_leaves_no_process() -> None:
    """The program names itself (its `comm`), ignores the polite signals and sleeps: it is seen
    running, then stopped at the timeout, and no process of that name is left on the machine (the
    kernel ends a PID namespace's processes as its first one exits: within moments, not at once)."""
    marker = f"sbx{os.urandom(5).hex()}"  # a comm holds 15 characters
    code = (f"import ctypes, signal, time\nctypes.CDLL(None).prctl(15, b'{marker}', 0, 0, 0)\n"
            "for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):\n    signal.signal(s, signal.SIG_IGN)\n"
            "time.sleep(10 ** 6)\n")
    seen: list[str] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set() and not seen:
            seen.extend(named(marker))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    started = time.perf_counter()
    result = run_program(code, timeout=3.0)
    done.set()
    watcher.join()
    assert result.outcome == "timeout" and time.perf_counter() - started < 10  # nothing held it up
    assert seen, "the sleeping program was never seen running"
    deadline = time.monotonic() + 10
    while named(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert named(marker) == []


def named(comm: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == comm:
                found.append(pid)
        except OSError:
            continue
    return found


@needs_sandbox
def test_a_memory_hog_is_stopped() -> None:
    result = run_program("blocks = []\nwhile True:\n    blocks.append(bytearray(32 * 1024 * 1024))\n", memory_mb=256)
    assert result.outcome == "memory" and not result.passed


@needs_sandbox
def test_filling_the_disk_stops_at_the_programs_own_folder() -> None:
    """It writes 1 MB files into its folder and /tmp until something stops it: the size of its
    tmpfs does (not the timeout), and nothing was written anywhere else."""
    code = ("import os\ni = 0\nwhile True:\n"
            "    for where in ('.', '/tmp'):\n"
            "        with open(os.path.join(where, f'f{i}'), 'wb') as f:\n            f.write(b'x' * 2 ** 20)\n"
            "        i += 1\n")
    result = run_program(code, timeout=20.0)
    assert not result.passed and "No space left on device" in result.detail, result


@needs_sandbox
def test_flooding_its_output_stops_at_the_file_size_limit() -> None:
    """Its stderr is a file under its RLIMIT_FSIZE, not a pipe this process reads whole: a flood
    ends at that limit (it fails; the timeout would say `timeout`)."""
    result = run_program("import sys\nwhile True:\n    sys.stderr.write('x' * 2 ** 20)\n", timeout=30.0)
    assert result.outcome == "failed", result


@needs_sandbox
def test_its_limits_cannot_be_raised() -> None:
    for limit in ("RLIMIT_AS", "RLIMIT_FSIZE", "RLIMIT_CPU", "RLIMIT_CORE"):
        result = run_program(f"import resource\nresource.setrlimit(resource.{limit}, (2 ** 40, 2 ** 40))")
        assert not result.passed, (limit, result)


# ---------------------------------------------------------------------------------------------
# files outside its folder


@pytest.fixture
def victims(tmp_path: Path) -> Iterator[list[Path]]:
    """A file in a folder of the project (where its data and models live) and one in the test's
    temporary folder; each program names them by their real paths."""
    project = Path(tempfile.mkdtemp(prefix=".sandbox-victims-", dir=ROOT))
    files = [project / "model.safetensors", tmp_path / "keep.txt"]
    for f in files:
        f.write_text("still here")
    try:
        yield files
    finally:
        shutil.rmtree(project)


RELOADED = ("import importlib, os, posix, shutil, subprocess\n"
            "for m in (os, shutil, subprocess):\n    importlib.reload(m)\n")
ATTACKS = {
    "write a new file": "open({new!r}, 'w').write('pwned')",
    "truncate": "open({victim!r}, 'w').close()",
    "delete through a reloaded os": RELOADED + "os.unlink({victim!r})",
    "delete through posix": RELOADED + "posix.unlink({victim!r})",
    "delete through shutil": RELOADED + "shutil.rmtree(os.path.dirname({victim!r}))",
    "rename": RELOADED + "os.rename({victim!r}, {new!r})",
    "delete through ctypes": "import ctypes\nassert ctypes.CDLL(None).unlink({victim!r}.encode()) == 0",
    "a shell through ctypes":
        "import ctypes\nassert ctypes.CDLL(None).system('rm -f {victim} && touch {new}'.encode()) == 0",
    "a subprocess": RELOADED + "subprocess.run(['sh', '-c', 'rm -f {victim} && touch {new}'], check=True)",
    "execve a shell": RELOADED + "os.execv('/bin/sh', ['sh', '-c', 'rm {victim} && touch {new}'])",
}


@needs_sandbox
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_files_outside_its_folder_are_out_of_reach(attack: str, victims: list[Path]) -> None:
    for victim in victims:
        new = victim.with_name("planted.txt")
        result = run_program(ATTACKS[attack].format(victim=str(victim), new=str(new)))
        assert not result.passed, (attack, victim, result)
        assert victim.read_text() == "still here" and not new.exists(), (attack, victim)


@needs_sandbox
def test_the_system_and_the_interpreter_are_read_only() -> None:
    stdlib = Path(os.__file__).parent
    planted = stdlib / f"sandbox-probe-{os.urandom(4).hex()}.py"
    try:
        for target in (planted, Path("/usr/sandbox-probe"), Path("/sandbox-probe"), Path("/dev/sandbox-probe")):
            result = run_program(f"open({str(target)!r}, 'w').write('x')")
            assert not result.passed and "Read-only file system" in result.detail, (target, result)
        assert not planted.exists()
    finally:
        planted.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# secrets, the network, other processes


@needs_sandbox
def test_secrets_on_the_machine_are_not_readable(victims: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A secret in the project and in the test's folder, one in this process's environment, and
    the system's password hashes: the program prints each, then fails on purpose with it in its
    last line; neither outcome nor detail carries it."""
    secret = f"s3cret-{os.urandom(6).hex()}"
    monkeypatch.setenv("LLM_FORGE_TEST_SECRET", secret)
    for victim in victims:
        victim.write_text(secret)
    reads = [f"open({str(v)!r}).read()" for v in victims] + ["os.environ['LLM_FORGE_TEST_SECRET']"]
    if Path("/etc/shadow").exists():
        reads.append("open('/etc/shadow').read()")
    for read in reads:
        result = run_program(f"import os\ns = {read}\nprint(s)\nraise SystemExit(s)")
        assert not result.passed and secret not in result.detail and "root:" not in result.detail, (read, result)


@needs_sandbox
def test_a_server_on_loopback_receives_nothing() -> None:
    """A server listens on this machine's loopback; the program connects through a reloaded
    socket module, the raw _socket module and ctypes' connect(): nothing arrives."""
    received: list[bytes] = []
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    port = server.getsockname()[1]
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            received.append(conn.recv(100) or b"(connected)")
            conn.close()

    thread = threading.Thread(target=accept)
    thread.start()
    programs = [
        "import importlib, socket\nimportlib.reload(socket)\n"
        f"socket.create_connection(('127.0.0.1', {port})).sendall(b'leak')",
        f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))\ns.send(b'leak')",
        "import ctypes, struct\nlibc = ctypes.CDLL(None)\nfd = libc.socket(2, 1, 0)\n"  # AF_INET, SOCK_STREAM
        f"addr = struct.pack('=H', 2) + struct.pack('!H', {port}) + bytes([127, 0, 0, 1]) + bytes(8)\n"
        "assert libc.connect(fd, addr, len(addr)) == 0 and libc.send(fd, b'leak', 4, 0) == 4",
    ]
    try:
        for code in programs:
            result = run_program(code)
            assert not result.passed, (code, result)
    finally:
        stop.set()
        thread.join()
        server.close()
    assert received == []


@needs_sandbox
def test_a_fork_bomb_fails_at_its_first_fork() -> None:
    """Processes are refused, not merely limited: every way to make one fails at once (it fails;
    the timeout would say `timeout`)."""
    bombs = [
        "import importlib, os\nimportlib.reload(os)\nwhile True:\n    os.fork()",
        "import ctypes\nlibc = ctypes.CDLL(None)\nwhile True:\n    assert libc.fork() >= 0",
        "import ctypes\nlibc = ctypes.CDLL(None)\nwhile True:\n    assert libc.syscall(57 if __import__('platform')"
        ".machine() == 'x86_64' else 220, 17, 0, 0, 0, 0) >= 0",  # raw fork, or clone(SIGCHLD)
        "import ctypes\nlibc = ctypes.CDLL(None)\nassert libc.unshare(0x10000000) == 0",  # a user namespace
    ]
    for code in bombs:
        result = run_program(code, timeout=5.0)
        assert result.outcome == "failed", (code, result)
    # threads are no processes: a program may still use them
    assert run_program("import threading\nt = threading.Thread(target=print)\nt.start()\nt.join()").passed


@needs_sandbox
def test_the_parent_cannot_be_signalled() -> None:
    """The program sends SIGWINCH (harmless where it lands) to this process, its group and its
    own parent: this process receives none."""
    got: list[int] = []
    before = signal.signal(signal.SIGWINCH, lambda sig, frame: got.append(sig))
    try:
        me, group = os.getpid(), os.getpgid(0)
        for send in (f"os.kill({me}, signal.SIGWINCH)", f"os.killpg({group}, signal.SIGWINCH)",
                     "os.kill(os.getppid(), signal.SIGWINCH)\nassert os.getppid() > 1"):
            result = run_program(f"import importlib, os, signal\nimportlib.reload(os)\n{send}")
            assert not result.passed, (send, result)
        time.sleep(0.2)
    finally:
        signal.signal(signal.SIGWINCH, before)
    assert got == []


# ---------------------------------------------------------------------------------------------
# where no sandbox can start


def test_without_bubblewrap_no_program_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH with no bwrap on it
    reason = sandbox.unavailable()
    assert reason and "not installed" in reason and "apt-get install bubblewrap" in reason and UNSAFE in reason
    marker = tmp_path / "ran"
    with pytest.raises(SandboxUnavailable, match="not installed"):
        run_program(f"open({str(marker)!r}, 'w').write('ran')")
    assert not marker.exists()
    # only the explicit unsafe choice runs it, unconfined: the marker is written
    assert run_program(f"import builtins\nbuiltins.open({str(marker)!r}, 'w').write('ran')", sandbox=UNSAFE).passed
    assert marker.read_text() == "ran"


def in_a_user_namespace(script: str, *, drop_sys_admin: bool) -> subprocess.CompletedProcess:
    """`python -c script` as root of a new user namespace where no further user namespace may be
    made (its max_user_namespaces is 0), and, with `drop_sys_admin`, without the capability that
    makes the other namespaces: the kernel refuses for real what a locked-down host refuses."""
    drop = "setpriv --bounding-set=-sys_admin --inh-caps=-sys_admin " if drop_sys_admin else ""
    shell = (f"echo 0 > /proc/sys/user/max_user_namespaces && exec {drop}"
             f"{sys.executable} -c \"$0\"")
    return subprocess.run(["unshare", "--user", "--map-root-user", "sh", "-c", shell, script], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@needs_sandbox
def test_where_the_kernel_refuses_namespaces_no_program_runs() -> None:
    if not shutil.which("unshare") or not shutil.which("setpriv") or subprocess.run(
            ["unshare", "--user", "--map-root-user", "true"], capture_output=True).returncode != 0:
        pytest.skip("this machine cannot make the user namespace the test runs in")
    script = ("from stages.common import sandbox\nprint(sandbox.unavailable())\n"
              "print(sandbox.run_program('import os\\nassert not os.path.exists(\"/etc/shadow\")').outcome)")
    # no user namespace: bubblewrap goes on without one, and the sandbox still holds
    done = in_a_user_namespace(script, drop_sys_admin=False)
    assert done.returncode == 0 and done.stdout.split() == ["None", "passed"], done.stderr[-2000:]
    # nor any namespace at all: no sandbox, no program, the reason names the refusal and the fix
    done = in_a_user_namespace(script, drop_sys_admin=True)
    assert "SandboxUnavailable: bubblewrap cannot start a sandbox here" in done.stderr, done.stderr[-2000:]
    assert "Creating new namespace failed" in done.stderr and "user namespaces" in done.stderr
    assert done.stdout.splitlines()[0].startswith("bubblewrap cannot start")


def code_config(tasks: tuple[str, ...], **changes: object) -> EvaluateConfig:
    """The tiny profile's evaluate section on the base row alone, with `tasks` (2 items each)."""
    limits = {"humaneval_sandbox": {"limit": 2, "max_new_tokens": 8, "holdout": False},
              "bigbench_arithmetic": {"limit": 2, "max_new_tokens": 4, "holdout": False}}
    section = {**tiny_params()["evaluate"], "models": ["base"], "preferences": None, "perplexity_blocks": 2,
               "task_dir": TASK_DIR, "tasks": {t: limits[t] for t in tasks}, **changes}
    return load_section(EvaluateConfig, "evaluate", {"evaluate": section})


def test_evaluate_without_bubblewrap_skips_the_code_cells_and_scores_the_rest(
        tiny_workdir: Paths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # the task YAMLs name their data relative to the project
    monkeypatch.setenv("PATH", str(tmp_path))
    metrics = run(code_config(("humaneval_sandbox", "bigbench_arithmetic")), tiny_workdir)
    reason = metrics["skipped"]["humaneval_sandbox"]
    assert "its programs were not run" in reason and "apt-get install bubblewrap" in reason
    assert "humaneval_sandbox" not in metrics["models"]["base"] and "bigbench_arithmetic" in metrics["models"]["base"]
    # lm-eval was never given the task: no completion was generated, so none was run
    results = json.loads((tiny_workdir.report_dir("evaluate") / "results/base.json").read_text())["results"]
    assert set(results) == {"bigbench_arithmetic"}
    assert "warnings" not in metrics
    table = (tiny_workdir.report_dir("evaluate") / "table.md").read_text()
    assert "humaneval_sandbox" in table and "not installed" in table


def test_evaluate_runs_code_unsandboxed_only_when_told_and_says_so(
        tiny_workdir: Paths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("PATH", str(tmp_path))
    metrics = run(code_config(("humaneval_sandbox",), code_sandbox=UNSAFE), tiny_workdir)
    assert "humaneval_sandbox" in metrics["models"]["base"] and "humaneval_sandbox" not in metrics["skipped"]
    assert "WITHOUT a sandbox" in metrics["warnings"][0]
    # a number, so the runner logs it to the MLflow run as a metric
    assert flatten_numbers(metrics)["unsandboxed_code_tasks"] == 1.0


def test_params_choose_bubblewrap() -> None:
    assert tiny_config("evaluate").code_sandbox == BWRAP
