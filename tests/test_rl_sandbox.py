"""The code sandbox (turbos.rl.sandbox): the security suite, then languages, tests, the pool, the
refusal to run without isolation, and the CLI.

Every attack below must end as a failed (or killed) run, leave the host as it was, and leave no
process of the run behind: none in the run's PID namespace, none with the attack's marker.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import resource
import socket
import subprocess
import time
from pathlib import Path

import pytest

from turbos.cli import main
from turbos.rl.sandbox import (
    BWRAP_ENV,
    SANDBOX_UID,
    Limits,
    Program,
    Sandbox,
    SandboxResult,
    SandboxUnavailable,
    UnsafeSandboxWarning,
    find_bwrap,
)

ROOT = Path(__file__).resolve().parents[1]
SANDBOX_FILE = ROOT / "src" / "turbos" / "rl" / "sandbox.py"
LIMITS = Limits(timeout=2, memory_mb=256, processes=32, file_mb=4, disk_mb=16, output_bytes=64 << 10)
_markers = itertools.count()


@pytest.fixture(scope="module")
def box():
    with Sandbox(LIMITS, max_workers=8) as sandbox:
        yield sandbox


@pytest.fixture
def canary():
    """A host process the sandbox must not be able to touch."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    assert proc.poll() is None, "the host canary process was killed"
    proc.kill()
    proc.wait()


def _marker() -> str:
    """A unique `sleep` argument, to find a run's processes on the host by their command line."""
    return f"1000.{os.getpid()}{next(_markers)}"


def _host_processes(predicate) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if predicate(entry):
                    found.append(int(entry))
            except OSError:  # it ended meanwhile
                pass
    return found


def _assert_nothing_left(result: SandboxResult, marker: str | None = None) -> None:
    """No host process is in the run's PID namespace (or carries ``marker``) any more."""
    assert result.pid_namespace is not None
    left = _host_processes(lambda pid: os.stat(f"/proc/{pid}/ns/pid").st_ino == result.pid_namespace)
    assert left == [], f"processes of the run left on the host: {left}"
    if marker is not None:
        tagged = _host_processes(lambda pid: marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes())
        assert tagged == [], f"the run's background processes survive: {tagged}"


# --- the security suite ------------------------------------------------------------------------


def test_network_is_an_own_loopback_only(box):
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.5)
    port = server.getsockname()[1]
    code = (
        "import socket\nprint(socket.if_nameindex())\n"
        f"socket.create_connection(('127.0.0.1', {port}), 1).send(b'x')\n"
    )
    with server:
        result = box.run(code)
        with pytest.raises(TimeoutError):
            server.accept()  # nothing came from the sandbox
        with socket.create_connection(("127.0.0.1", port), 1):  # the server itself was reachable
            server.accept()[0].close()
    assert result.exit_code == 1 and "ConnectionRefusedError" in result.stderr
    assert result.stdout == "[(1, 'lo')]\n"
    _assert_nothing_left(result)


@pytest.mark.parametrize("where", ["host tmp", "repository", "/root", "/usr", "/etc/passwd"])
def test_cannot_write_outside_its_directories(box, tmp_path, where):
    host_file = tmp_path / "host.txt"
    host_file.write_text("original")
    target = {
        "host tmp": host_file,
        "repository": ROOT / "sandbox-escape.txt",
        "/root": Path("/root/sandbox-escape.txt"),
        "/usr": Path("/usr/sandbox-escape.txt"),
        "/etc/passwd": Path("/etc/passwd"),
    }[where]
    before = target.read_bytes() if target.exists() else None
    result = box.run(f"open({str(target)!r}, 'a').write('pwned')\n")
    assert result.exit_code == 1
    assert any(e in result.stderr for e in ("FileNotFoundError", "Read-only file system", "PermissionError"))
    assert (target.read_bytes() if target.exists() else None) == before
    assert host_file.read_text() == "original"
    _assert_nothing_left(result)


def test_writes_stay_in_its_size_limited_tmpfs(box):
    code = (
        "open('/work/a', 'w').write('ok'); open('/tmp/b', 'w').write('ok')\n"
        "for i in range(8):\n    open(f'/tmp/{i}', 'wb').write(bytes(3 << 20))\n"
    )
    assert box.run("open('/work/a', 'wb').write(bytes(8 << 20))\n").stderr.endswith("File too large\n")
    result = box.run(code)  # 24 MB into a 16 MB /tmp, 3 MB at a time (under the 4 MB file limit)
    assert result.exit_code == 1 and "No space left on device" in result.stderr
    _assert_nothing_left(result)


def test_no_host_environment_home_or_repository(box, monkeypatch):
    monkeypatch.setenv("TURBOS_SECRET", "hunter2-sandbox")
    code = f"""
import os
print(sorted(os.environ))
for pid in (p for p in os.listdir('/proc') if p.isdigit()):
    print(open(f'/proc/{{pid}}/environ', 'rb').read())
print(os.path.exists({str(ROOT / "pyproject.toml")!r}), os.path.exists('/root'), os.path.expanduser('~'))
os.listdir('/root')
"""
    result = box.run(code)
    assert "hunter2" not in result.stdout + result.stderr and "TURBOS_SECRET" not in result.stdout
    assert "False False /work\n" in result.stdout
    assert result.exit_code == 1 and "FileNotFoundError" in result.stderr
    _assert_nothing_left(result)


def test_fork_bomb_is_contained(box):
    counting = (
        "import os, time\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n"
        "            time.sleep(30)\n            os._exit(0)\n        n += 1\n"
        "except OSError as err:\n    print(n, err.errno)\n    raise SystemExit(1)\n"
    )
    result = box.run(counting, limits=Limits(timeout=5, processes=16))
    forked, code = map(int, result.stdout.split())
    assert code == errno.EAGAIN and forked <= 16 - 2  # PID 1 (a shell) and the program count too
    assert result.exit_code == 1 and result.wall_seconds < 2  # its sleeping children die with it
    _assert_nothing_left(result)

    bomb = box.run(":(){ :|:& };:\nsleep 60", language="bash")  # forks on in the background
    assert not bomb.ok and bomb.killed in ("timeout", "output")
    _assert_nothing_left(bomb)
    assert subprocess.run(["true"]).returncode == 0  # the host still forks
    assert box.run("print(1)").stdout == "1\n"


def test_infinite_loop_is_killed_at_the_timeout(box):
    result = box.run("while True:\n    pass\n", limits=Limits(timeout=1))
    assert result.timed_out and result.killed == "timeout" and result.exit_code == 128 + 9
    assert 1 <= result.wall_seconds < 2
    _assert_nothing_left(result)


def test_cpu_limit(box):
    result = box.run("while True:\n    pass\n", limits=Limits(timeout=5, cpu_seconds=1))
    assert result.killed == "cpu" and not result.timed_out and result.wall_seconds < 3
    _assert_nothing_left(result)


@pytest.mark.parametrize(
    "code", ["blocks = []\nwhile True:\n    blocks.append(bytearray(10 << 20))\n", "bytearray(1 << 30)\n"]
)
def test_memory_bomb_is_killed_by_the_memory_limit(box, code):
    result = box.run(code)
    assert result.killed == "memory" and result.exit_code == 1 and "MemoryError" in result.stderr
    _assert_nothing_left(result)


@pytest.mark.parametrize(
    ("language", "code", "stream"),
    [
        (
            "python",
            "import sys\nblock = 'x' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.write(block)\n",
            "stdout",
        ),
        ("bash", "yes 1>&2", "stderr"),
    ],
)
def test_a_gigabyte_of_output_is_cut(box, language, code, stream):
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = box.run(code, language=language)
    assert result.killed == "output" and getattr(result, f"{stream}_truncated") and result.truncated
    assert len(getattr(result, stream).encode()) == LIMITS.output_bytes
    assert result.wall_seconds < 2
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 64 << 10  # KiB: < 64 MiB
    _assert_nothing_left(result)


def test_os_system_and_subprocess_stay_inside(box, canary):
    code = f"""
import os, subprocess, sys
os.system('kill -9 {canary.pid}')
print(subprocess.run(['id', '-u'], capture_output=True, text=True).stdout.strip())
print(subprocess.run(['ps', '-eo', 'pid,comm', '--no-headers'], capture_output=True, text=True).stdout)
sys.exit(subprocess.run(['kill', '-9', '{canary.pid}']).returncode)
"""
    result = box.run(code)
    uid, *processes = result.stdout.strip().splitlines()
    assert uid == str(SANDBOX_UID) and len(processes) <= 3  # sh (PID 1), python, ps
    assert all(int(line.split()[0]) < 20 for line in processes)
    assert result.exit_code != 0
    _assert_nothing_left(result)


def test_ctypes_cannot_kill_the_host_or_raise_its_limits(box, canary):
    code = f"""
import ctypes, resource
libc = ctypes.CDLL(None, use_errno=True)
libc.kill(-1, 9)
print('kill', libc.kill({canary.pid}, 9), ctypes.get_errno())
class RLimit(ctypes.Structure):
    _fields_ = [('cur', ctypes.c_ulong), ('max', ctypes.c_ulong)]
for which in (resource.RLIMIT_NPROC, resource.RLIMIT_AS, resource.RLIMIT_CPU, resource.RLIMIT_FSIZE):
    print('setrlimit', libc.setrlimit(which, ctypes.byref(RLimit(1 << 40, 1 << 40))), ctypes.get_errno())
print(resource.getrlimit(resource.RLIMIT_NPROC), resource.getrlimit(resource.RLIMIT_AS))
bytearray(1 << 30)
"""
    result = box.run(code)
    lines = result.stdout.splitlines()
    assert lines[0] == f"kill -1 {errno.ESRCH}"  # not in its PID namespace
    assert lines[1:5] == [f"setrlimit -1 {errno.EPERM}"] * 4
    assert lines[5] == f"(32, 32) ({256 << 20}, {256 << 20})"
    assert result.killed == "memory"  # the limit still holds
    _assert_nothing_left(result)


def test_proc_shows_only_its_own_processes(box, monkeypatch):
    monkeypatch.setenv("TURBOS_SECRET", "hunter2-sandbox")
    code = f"""
import os
print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))
print(os.path.exists('/proc/{os.getpid()}'), repr(open('/proc/1/environ').read()))
value = open('/proc/sys/vm/overcommit_memory').read()
open('/proc/sys/vm/overcommit_memory', 'w').write(value)
"""
    result = box.run(code)
    pids, visible = result.stdout.splitlines()[:2]
    assert max(json.loads(pids)) < 20 and visible.startswith("False ")
    assert "hunter2" not in result.stdout and "TURBOS_SECRET" not in result.stdout
    assert result.exit_code == 1 and any(e in result.stderr for e in ("Read-only", "PermissionError"))
    _assert_nothing_left(result)


def test_killing_its_parent_touches_nothing_on_the_host(box, canary):
    code = f"""
import os, signal, time
print(os.getppid())
os.kill(os.getppid(), signal.SIGKILL)
os.kill(1, signal.SIGKILL)
time.sleep(0.2)
print('alive')
os.kill({canary.pid}, signal.SIGKILL)
"""
    result = box.run(code)
    assert result.stdout == "1\nalive\n"  # its parent is the sandbox's PID 1, which ignores it
    assert result.exit_code == 1 and "ProcessLookupError" in result.stderr
    _assert_nothing_left(result)


@pytest.mark.parametrize("then", ["wait past the timeout", "exit"])
def test_background_processes_do_not_survive_the_run(box, then):
    marker = _marker()
    code = f"""
import os, subprocess, time
subprocess.Popen(['nohup', 'sleep', '{marker}'], start_new_session=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
if os.fork() == 0:  # double fork + setsid
    os.setsid()
    if os.fork() == 0:
        os.execv('/bin/sleep', ['sleep', '{marker}'])
    os._exit(0)
time.sleep(0.3)
print(subprocess.run(['pgrep', '-fc', '{marker}'], capture_output=True, text=True).stdout.strip(), flush=True)
{"time.sleep(60)" if then.startswith("wait") else ""}
"""
    result = box.run(code, limits=Limits(timeout=1.5))
    assert result.stdout == "2\n"  # both were running inside
    if then.startswith("wait"):
        assert result.timed_out
    else:
        assert result.exit_code == 0 and result.wall_seconds < 1.2  # the run did not wait for them
    _assert_nothing_left(result, marker)


# --- refusal, languages, tests, pool -----------------------------------------------------------


def _failing_bwrap(tmp_path: Path) -> Path:
    """A bwrap that fails as it does where user namespaces are disabled."""
    tmp_path.chmod(0o755)  # as root the sandbox starts bwrap as uid 65534
    fake = tmp_path / "bwrap"
    fake.write_text(
        "#!/bin/sh\necho 'bwrap: No permissions to create new namespace, likely because the kernel "
        "does not allow non-privileged user namespaces.' >&2\nexit 1\n"
    )
    fake.chmod(0o755)
    return fake


def test_refuses_to_run_without_isolation(tmp_path, monkeypatch):
    fake = _failing_bwrap(tmp_path)
    with pytest.raises(SandboxUnavailable, match="No permissions to create new namespace") as err:
        Sandbox(bwrap_path=fake)
    message = str(err.value)
    assert str(fake) in message and "user namespaces" in message and "unsafe_no_isolation=True" in message
    monkeypatch.setenv(BWRAP_ENV, str(fake))
    assert find_bwrap() == str(fake)
    with pytest.raises(SandboxUnavailable):
        Sandbox()
    with pytest.raises(SandboxUnavailable):
        Sandbox(bwrap_path=tmp_path / "missing")


def test_unsafe_no_isolation_runs_with_a_warning(tmp_path):
    with pytest.warns(UnsafeSandboxWarning, match="unsafe_no_isolation"):
        box = Sandbox(Limits(timeout=1), bwrap_path=_failing_bwrap(tmp_path), unsafe_no_isolation=True)
    with box:
        assert box.run("print(6 * 7)").stdout == "42\n"
        looping = box.run("while True:\n    pass\n")
        assert looping.timed_out and looping.pid_namespace is None
        assert box.run_tests("x = 1", "assert x == 1").passed


@pytest.mark.parametrize(
    ("language", "code"),
    [("python", "a, b = map(int, input().split())\nprint(a + b)"), ("bash", "read a b\necho $((a + b))")],
)
def test_programs_read_stdin(box, language, code):
    result = box.run(code, language=language, stdin="2 3\n")
    assert result.ok and result.stdout == "5\n" and result.stderr == "" and result.passed is None
    assert box.run(code, language=language).stdout != "5\n"  # no stdin: an empty input


CASES = {
    "python": (
        "def add(a, b):\n    return a + b\nprint('hi')",
        "assert add(2, 3) == 5",
        "assert add(2, 3) == 6",
        "import sys\nsys.exit(0)",
    ),
    "bash": (
        "add() { echo $(($1 + $2)); }\necho hi",
        '[ "$(add 2 3)" = 5 ]',
        '[ "$(add 2 3)" = 6 ]',
        "exit 0",
    ),
}


@pytest.mark.parametrize("language", ["python", "bash"])
def test_tests_pass_or_fail(box, language):
    code, good, bad, early_exit = CASES[language]
    passed = box.run_tests(code, good, language=language)
    assert passed.passed is True and passed.ok and passed.stdout == "hi\n"
    failed = box.run_tests(code, bad, language=language)
    assert failed.passed is False and not failed.ok and failed.exit_code != 0
    skipped = box.run_tests(f"{code}\n{early_exit}", good, language=language)
    assert skipped.exit_code == 0 and skipped.passed is False  # exiting before the tests is no pass


def test_pool_runs_eight_programs_in_parallel(box):
    programs = [Program(f"import time\ntime.sleep(0.5)\nprint({i} * {i})") for i in range(8)]
    programs[3] = Program("read x\necho $((x * x))", language="bash", stdin="3\n")
    start = time.monotonic()
    results = box.run_many(programs)
    wall = time.monotonic() - start
    assert [r.stdout for r in results] == [f"{i * i}\n" for i in range(8)]
    assert all(r.ok for r in results) and len({r.pid_namespace for r in results}) == 8
    assert wall < 2.0  # one after another they would take 3.5 s
    for result in results:
        _assert_nothing_left(result)


@pytest.mark.skipif(
    os.geteuid() != 0 or not Path("/usr/bin/python3").exists(),
    reason="starts a rootless sandbox as uid 65534 with the system Python (needs root and /usr/bin/python3)",
)
def test_rootless(box):
    bwrap = box.bwrap
    readable = all(os.stat(p).st_mode & 0o005 == 0o005 for p in [*SANDBOX_FILE.parents, Path(bwrap).parent])
    if not readable:
        pytest.skip("the repository or bwrap is not readable by uid 65534")
    script = f"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("sandbox", {str(SANDBOX_FILE)!r})
sandbox = importlib.util.module_from_spec(spec)
sys.modules["sandbox"] = sandbox
spec.loader.exec_module(sandbox)
box = sandbox.Sandbox(sandbox.Limits(timeout=2, processes=8), bwrap_path={bwrap!r})
print(json.dumps([box.run(code).stdout for code in sys.argv[1:]]))
"""
    codes = [
        "import os, socket\nprint(os.getuid(), socket.if_nameindex())",
        "import os\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n"
        "            os.pause()\n        n += 1\nexcept OSError:\n    print(n)",
    ]
    done = subprocess.run(
        ["/usr/bin/python3", "-B", "-c", script, *codes],
        user=SANDBOX_UID,
        group=SANDBOX_UID,
        extra_groups=[],
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [f"{SANDBOX_UID} [(1, 'lo')]\n", "6\n"]


def test_limits_are_checked():
    with pytest.raises(ValueError):
        Limits(timeout=0)
    with pytest.raises(ValueError):
        Limits(processes=1)


def test_cli_sandbox_run(tmp_path, capsys):
    program = tmp_path / "add.py"
    program.write_text("def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n")
    good, bad = tmp_path / "good.py", tmp_path / "bad.py"
    good.write_text("assert add(2, 3) == 5\n")
    bad.write_text("assert add(2, 3) == 6\n")
    assert main(["sandbox", "run", str(program), "--tests", str(good)]) == 0
    out = capsys.readouterr().out
    assert "exit code: 0" in out and "5\n" in out and "tests: passed" in out
    assert main(["sandbox", "run", str(program), "--tests", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "tests: failed" in out and "AssertionError" in out
    loop = tmp_path / "loop.sh"
    loop.write_text("while true; do :; done\n")
    assert main(["sandbox", "run", str(loop), "--timeout", "1"]) == 1
    assert "killed: timeout" in capsys.readouterr().out
    hog = tmp_path / "hog.py"
    hog.write_text("bytearray(1 << 30)\n")
    assert main(["sandbox", "run", str(hog), "--language", "python", "--memory-mb", "64"]) == 1
    assert "killed: memory" in capsys.readouterr().out


def test_the_code_reward_runs_replies_against_the_hidden_tests_in_the_sandbox() -> None:
    from turbos.data.tasks.code import generate_code_problems
    from turbos.rl.rewards import code_reward, reply_code

    problems = generate_code_problems(3, levels=(1, 3, 5), seed=0)
    right = [f"Here it is:\n```python\n{p.solution}```\nAnswer: done" for p in problems]
    wrong = [f"def {p.function}(*args):\n    return None\n" for p in problems]
    sneaky = ["import os\nos.system('kill -9 -1')\nopen('/tmp/x', 'w')\n" for _ in problems]
    contents = right + wrong + sneaky
    answers = [p.test_source() for p in problems] * 3
    rewards = code_reward(["q"] * len(contents), contents, content=contents, answer=answers)
    assert rewards == [1.0] * 3 + [0.0] * 6
    assert reply_code("no fence: x = 1") == "no fence: x = 1"
    assert reply_code("```python\na = 1\n```\n```py\nb = 2\n```") == "b = 2\n"
