"""Run untrusted generated programs in a sandbox with time, memory, process and network limits.

    result = run_program(source, timeout_s=5, memory_mb=512)
    result.status   # one of STATUSES, or "killed: signal N"
    result.backend  # "bwrap" or "guard": which sandbox ran it

Two backends (see docs/evaluation.md for what each does and does not guarantee):

- "bwrap" (bubblewrap; used when it is installed and passes a probe, run once per process): the
  program sees a read-only system (/usr, the /lib and /bin links, the loader's cache, Python's
  own directories; not the rest of /etc, /home or /root), a private /tmp, and its working
  directory as the only writable place. It has no network (empty network namespace), its own
  PID namespace (every process it starts dies when the run ends) and a process limit
  (RLIMIT_NPROC, `max_processes` tasks). RLIMIT_NPROC is not enforced for uid 0, so as root the
  program runs as a fresh unprivileged uid chosen per run (no capabilities, no host account);
  as a normal user bwrap's user namespace makes the count per run. A monitor inside the sandbox
  (outside the program's reach as root) watches the count and ends the run when it reaches the
  limit. The probe checks that fork really fails at the limit here before the backend is used.
- "guard" (the fallback): `python -I` in a fresh directory, its own session, an empty network
  namespace (`unshare --net`) where the kernel allows it, and an audit hook; the whole system is
  readable and there is no kernel process limit. C code bypasses an audit hook: this is a guard
  against a model's accidents, not a boundary against an adversary.

Both: a fresh temporary working directory, a minimal environment, `python -I`, rlimits set
before the program runs (address space `memory_mb`, CPU seconds, file size 16 MiB, no core
files), a wall-clock timeout, and the same audit hook (sockets, starting programs, ctypes,
setrlimit, writes/renames/deletions and sqlite3 databases outside the working directory are
refused), so an ordinary program gets the same result under either. The fallback also disables
the private `_posixsubprocess.fork_exec` that subprocess uses (under bwrap the kernel contains
it); only bwrap limits processes and threads (`max_processes`).
"""
from __future__ import annotations

import dataclasses
import fcntl
import functools
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

GUARD = textwrap.dedent('''
    import os, resource, sys
    _mem, _cpu, _harden = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
    resource.setrlimit(resource.RLIMIT_AS, (_mem, _mem))
    resource.setrlimit(resource.RLIMIT_CPU, (_cpu, _cpu + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _ROOT = os.path.realpath(os.getcwd())
    _WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    _BLOCKED = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
                "os.fork", "os.forkpty", "pty.", "ctypes.", "os.kill", "os.killpg",
                "resource.setrlimit", "resource.prlimit", "sqlite3.enable_load_extension",
                "sqlite3.load_extension")
    _PATH_EVENTS = {"os.remove": 1, "os.rename": 2, "os.rmdir": 1, "os.mkdir": 1,
                    "os.chmod": 1, "os.chown": 1, "os.truncate": 1, "os.link": 2,
                    "os.symlink": 2, "shutil.rmtree": 1, "os.utime": 1}

    def _inside(path):
        if isinstance(path, int):
            return True
        p = os.path.realpath(os.fsdecode(path))
        return p == _ROOT or p.startswith(_ROOT + os.sep)

    def _sqlite_file(database):
        db = os.fsdecode(database)
        if db in ("", ":memory:"):
            return None
        if db.startswith("file:"):
            db, _, query = db[5:].partition("?")
            if db in ("", ":memory:") or "mode=memory" in query:
                return None
        return db

    def _guard(event, args):
        if event.startswith(_BLOCKED):
            raise PermissionError(f"sandbox: {event} is blocked (no network, no processes)")
        if event == "open":
            path, mode, flags = args
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \\
                     (mode is None and isinstance(flags, int) and flags & _WRITE_FLAGS)
            if writes and not _inside(path):
                raise PermissionError(f"sandbox: writing {path!r} outside {_ROOT} is blocked")
        elif event in _PATH_EVENTS:
            for path in args[:_PATH_EVENTS[event]]:
                if path is not None and not _inside(path):
                    raise PermissionError(f"sandbox: {event} on {path!r} is blocked")
        elif event == "sqlite3.connect":
            path = _sqlite_file(args[0])
            if path is not None and not _inside(path):
                raise PermissionError(f"sandbox: sqlite3 database {path!r} outside {_ROOT} "
                                      "is blocked")
        elif _harden and event == "import" and args[0] == "_posixsubprocess":
            raise PermissionError("sandbox: importing _posixsubprocess again is blocked")

    if _harden:  # no kernel process limit in the fallback: disable the C entry subprocess uses
        import _posixsubprocess

        def _no_fork_exec(*args, **kwargs):
            raise PermissionError("sandbox: _posixsubprocess.fork_exec is blocked (no processes)")
        _posixsubprocess.fork_exec = _no_fork_exec
        del _no_fork_exec
    sys.addaudithook(_guard)
    del _guard
    import runpy
    runpy.run_path("program.py", run_name="__main__")
''')

# Runs inside bwrap (python -I -c MONITOR CONFIG). It sets the process limit and forks the
# program's process (one interpreter start, not two), which becomes the run's own unprivileged
# uid when we are root, closes the monitor's descriptors and runs cfg["source"] (the guard)
# with cfg["argv"]. The monitor counts the sandbox's tasks every 10 ms and reports on the
# inherited pipe: {"event": "limit"} (then exits: bwrap's init ends the sandbox and the kernel
# kills every process in it) or {"event": "exit", "returncode", "left", "peak"}.
MONITOR = textwrap.dedent('''
    import json, os, resource, select, sys, time
    cfg = json.loads(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_NPROC, (cfg["rlimit"], cfg["rlimit"]))
    child = os.fork()
    if child == 0:
        os.closerange(3, min(resource.getrlimit(resource.RLIMIT_NOFILE)[0], 1 << 20))
        if cfg["uid"] is not None:
            os.setgroups([])
            os.setgid(cfg["uid"])
            os.setuid(cfg["uid"])
        sys.argv = cfg["argv"]
        exec(compile(cfg["source"], cfg["argv"][0], "exec"), {"__name__": "__main__"})
        sys.exit(0)
    out = os.fdopen(cfg["report_fd"], "w", buffering=1)
    skip = {"1", str(os.getpid())}  # bwrap's init and this monitor

    def tasks():
        n = 0
        for name in os.listdir("/proc"):
            if name.isdigit() and name not in skip:
                try:
                    with open(f"/proc/{name}/stat", "rb") as f:
                        n += max(1, int(f.read().rsplit(b")", 1)[1].split()[17]))
                except (OSError, IndexError, ValueError):
                    pass
        return n

    try:
        waiter = os.pidfd_open(child)
    except (AttributeError, OSError):
        waiter = None
    peak, status = 0, None
    while status is None:
        n = tasks()
        peak = max(peak, n)
        if n >= cfg["limit"] and cfg["stop_at_limit"]:
            out.write(json.dumps({"event": "limit", "tasks": n}) + "\\n")
            os._exit(0)
        if waiter is None:
            time.sleep(0.01)
        else:
            select.select([waiter], [], [], 0.01)
        pid, status = os.waitpid(child, os.WNOHANG)
        status = status if pid else None
    left = tasks()
    out.write(json.dumps({"event": "exit", "returncode": os.waitstatus_to_exitcode(status),
                          "left": left, "peak": max(peak, left + 1)}) + "\\n")
''')

# The probe (no audit hook): fork until the kernel refuses; the backend is used only if that
# happens exactly at the limit, the working directory is writable and /etc/passwd is absent.
PROBE = textwrap.dedent('''
    import os, sys
    limit, n = int(sys.argv[1]), 0
    r, w = os.pipe()
    try:
        while n < 4 * limit:
            if os.fork() == 0:
                os.close(w)
                os.read(r, 1)
                os._exit(0)
            n += 1
    except BlockingIOError:
        pass
    with open("probe.txt", "w") as f:
        f.write(str(n))
    sys.exit(0 if n == limit - 1 and not os.path.exists("/etc/passwd") else 3)
''')

TOO_MANY_PROCESSES = "killed: too many processes"  # reached max_processes (bwrap)
LEFT_RUNNING = "killed: processes left running"     # exited, but processes it started ran on
STATUSES = ("passed", "failed", "timeout", "memory", TOO_MANY_PROCESSES, LEFT_RUNNING)
KILLED_BY_SIGNAL = "killed: signal {}"  # any other signal: "killed: signal 6" (SIGABRT), ...
BACKENDS = ("auto", "bwrap", "guard")
RUN_UIDS = (2_100_000_000, 2_140_000_000)  # as root under bwrap: a fresh uid per run from here
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
SYSTEM_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime")


@dataclasses.dataclass
class ExecResult:
    status: str
    returncode: int | None
    stderr: str  # the last 2,000 characters
    network_namespace: bool
    backend: str = "guard"  # "bwrap" or "guard"

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclasses.dataclass
class _Raw:
    """What one run observed, before it is named by _status."""
    returncode: int | None  # the program's exit code (negative: killed by that signal)
    timed_out: bool = False
    too_many: bool = False  # the sandbox's tasks reached the process limit
    left: int = 0  # processes still running when the program exited
    stderr: str = ""
    reported: bool = True  # bwrap: the monitor reported (False: the sandbox itself failed)


@functools.lru_cache(maxsize=1)
def unshare_prefix() -> tuple[str, ...]:
    """The command prefix that gives a child an empty network namespace here, or ()."""
    exe = shutil.which("unshare")
    if exe is None:
        return ()
    for prefix in ((exe, "--net"), (exe, "--net", "--map-root-user")):
        try:
            if subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0:
                return prefix
        except (OSError, subprocess.SubprocessError):
            pass
    return ()


@functools.lru_cache(maxsize=1)
def _bwrap_help() -> str:
    exe = shutil.which("bwrap")
    if exe is None:
        return ""
    try:
        return subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


@functools.lru_cache(maxsize=1)
def bwrap_problem() -> str | None:
    """None when the bwrap backend works here, else why not (probed once per process)."""
    if shutil.which("bwrap") is None:
        return "bwrap is not installed (Debian/Ubuntu package: bubblewrap)"
    limit = 6
    try:
        with tempfile.TemporaryDirectory(prefix="hibari-sandbox-probe-") as work:
            raw = _run_bwrap(work, PROBE, ["probe", str(limit)],
                             timeout_s=30.0, max_processes=limit, stop_at_limit=False)
            wrote = os.path.exists(os.path.join(work, "probe.txt"))
    except OSError as e:
        return f"bwrap could not start: {e}"
    if raw.timed_out or not raw.reported:
        return f"bwrap did not run the probe: {raw.stderr.strip()[-500:]}"
    if raw.returncode != 0 or not wrote:
        return ("bwrap ran, but the probe failed (fork must fail exactly at the process limit, "
                f"the working directory be writable, /etc/passwd be hidden): exit code "
                f"{raw.returncode}, wrote={wrote}, {raw.stderr.strip()[-500:]}")
    return None


def bwrap_usable() -> bool:
    return bwrap_problem() is None


def _bind_args(work: str) -> list[str]:
    """Read-only system and Python, private /tmp, `work` read-write; nothing else."""
    args, bound, made = [], [], {"/"}

    def parents(dest):  # bwrap would make missing parents 0700: unreadable to the run's uid
        out, parent = [], os.path.dirname(dest)
        while parent not in made and not any(parent == b or parent.startswith(b + "/")
                                             for b in bound):
            out.insert(0, parent)
            made.add(parent)
            parent = os.path.dirname(parent)
        return [a for d in out for a in ("--dir", d)]
    for top in SYSTEM_DIRS:
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
            made.add(top)
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
            bound.append(top)
    for path in SYSTEM_FILES:
        if os.path.exists(path):
            args += [*parents(path), "--ro-bind", path, path]
    args += ["--proc", "/proc", "--dev", "/dev"]
    options = _bwrap_help()  # --perms and --size: bubblewrap >= 0.6 / 0.7
    args += ["--perms", "1777"] if "--perms" in options else []
    args += ["--size", str(64 << 20)] if "--size" in options else []
    args += ["--tmpfs", "/tmp"]
    made |= {"/proc", "/dev", "/tmp"}
    wanted = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix}
    hop, seen = os.path.abspath(sys.executable), set()
    while hop not in seen:  # every link on the way to the interpreter (venv, alternatives, ...)
        seen.add(hop)
        wanted.add(os.path.dirname(hop))
        if not os.path.islink(hop):
            break
        hop = os.path.normpath(os.path.join(os.path.dirname(hop), os.readlink(hop)))
    wanted.add(os.path.dirname(os.path.realpath(sys.executable)))
    pairs = set()
    for path in wanted:
        if path and os.path.isdir(path):
            dest, src = os.path.abspath(path), os.path.realpath(path)
            pairs |= {(src, dest), (src, src)}
    for src, dest in sorted(pairs, key=lambda p: (p[1].count("/"), p[1])):
        if src == dest and any(dest == b or dest.startswith(b + "/") for b in bound):
            continue  # already visible, the same as on the host
        args += [*parents(dest), "--ro-bind", src, dest]
        if src == dest:
            bound.append(dest)
    return args + [*parents(work), "--bind", work, work, "--chdir", work]


def _read_available(fd: int) -> bytes:
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _tail(f) -> str:
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - 8000))
    return f.read().decode(errors="replace")[-2000:]


def _env(work: str) -> dict:
    # one thread per numeric library: threads count against the process limit
    return {"PATH": "/usr/bin:/bin", "HOME": work, "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1"}


def _run_bwrap(work: str, source: str, argv: list[str], *, timeout_s: float,
               max_processes: int, stop_at_limit: bool = True) -> _Raw:
    """Run `source` (with sys.argv = argv) in bwrap under the monitor; the run ends with every
    process it started."""
    root = os.geteuid() == 0
    uid = random.SystemRandom().randrange(*RUN_UIDS) if root else None
    if uid is not None:  # the run's own uid owns the working directory, nothing else
        for dirpath, _, files in os.walk(work):
            for name in [dirpath, *(os.path.join(dirpath, f) for f in files)]:
                os.chown(name, uid, uid)
    report_r, report_w = os.pipe()
    info_r, info_w = os.pipe()
    # as a normal user bwrap's own init and the monitor share the run's count (its userns)
    cfg = {"report_fd": report_w, "uid": uid, "source": source, "argv": argv,
           "limit": max_processes,
           "rlimit": max_processes + (0 if root else 2), "stop_at_limit": stop_at_limit}
    userns = [] if root or "--disable-userns" not in _bwrap_help() else \
        ["--unshare-user", "--disable-userns"]
    cmd = [shutil.which("bwrap"), "--unshare-pid", "--unshare-net", "--unshare-ipc",
           "--unshare-uts", "--unshare-cgroup-try", *userns, "--die-with-parent",
           "--new-session", "--info-fd", str(info_w), *_bind_args(work),
           "--", sys.executable, "-I", "-c", MONITOR, json.dumps(cfg)]
    try:
        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(cmd, env=_env(work), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=err,
                                    pass_fds=(report_w, info_w), start_new_session=True)
            os.close(report_w)
            os.close(info_w)
            report_w = info_w = -1
            timed_out = False
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _end_bwrap(proc, info_r)
            stderr = _tail(err)
        events = [json.loads(line) for line in _read_available(report_r).decode().splitlines()
                  if line.strip()]
    finally:
        for fd in (report_r, report_w, info_r, info_w):
            if fd >= 0:
                os.close(fd)
    too_many = any(e["event"] == "limit" for e in events)
    done = next((e for e in events if e["event"] == "exit"), None)
    if done is None:
        code = -signal.SIGKILL if (timed_out or too_many) else proc.returncode
        return _Raw(code, timed_out, too_many, 0, stderr, reported=timed_out or too_many)
    return _Raw(done["returncode"], timed_out, done["peak"] >= max_processes, done["left"],
                stderr)


def _end_bwrap(proc: subprocess.Popen, info_r: int) -> None:
    """Return once the sandbox is gone: bwrap can exit as soon as its init reports the
    program's exit status, before the kernel has killed the rest of the PID namespace; so wait
    for that init too (it exits only after every process in the namespace is gone). On a
    timeout kill the init (the kernel kills the rest), or bwrap itself if it is not up yet."""
    try:
        pid1 = json.loads(_read_available(info_r).decode() or "{}").get("child-pid")
    except ValueError:
        pid1 = None
    init = None
    if pid1:
        try:
            init = os.pidfd_open(pid1)
        except (AttributeError, OSError):
            pass
    try:
        if proc.returncode is None:
            try:
                if not pid1:
                    raise ProcessLookupError
                os.kill(pid1, signal.SIGKILL)
                proc.wait(timeout=10)
            except (ProcessLookupError, PermissionError, subprocess.TimeoutExpired):
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        if init is not None:
            select.select([init], [], [], 10.0)
        elif pid1:  # no pidfd here (kernel < 5.3): poll
            deadline = time.monotonic() + 10.0
            while os.path.exists(f"/proc/{pid1}/ns") and time.monotonic() < deadline:
                time.sleep(0.005)
    finally:
        if init is not None:
            os.close(init)


def _run_guard(work: str, timeout_s: float, limits: list[str], prefix: tuple[str, ...]) -> _Raw:
    """The fallback: the audit-hook guard in its own session (the session is killed after)."""
    with tempfile.TemporaryFile() as err:
        # the child sets its own rlimits before any program code runs (no preexec_fn: forking
        # a multithreaded JAX process is unsafe)
        proc = subprocess.Popen([*prefix, sys.executable, "-I", "guard.py", *limits, "1"],
                                cwd=work, env=_env(work), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            if proc.returncode is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        left = 0
        try:  # the program's process group outlives it when something it started runs on
            os.killpg(proc.pid, 0)
            left = 1
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return _Raw(proc.returncode, timed_out, False, left, _tail(err))


def _status(raw: _Raw) -> str:
    code, stderr = raw.returncode, raw.stderr
    if raw.too_many:
        return TOO_MANY_PROCESSES
    if raw.timed_out:
        return "timeout"
    if code == 0:
        return LEFT_RUNNING if raw.left else "passed"
    if code == -signal.SIGXCPU or code == -signal.SIGKILL and "MemoryError" not in stderr:
        return "timeout"  # the CPU limit (soft: SIGXCPU, hard: SIGKILL)
    if "MemoryError" in stderr or code == -signal.SIGSEGV:
        return "memory"
    if code is not None and code < 0:
        return KILLED_BY_SIGNAL.format(-code)
    return "failed"


def run_program(source: str, *, timeout_s: float = 5.0, memory_mb: int = 512,
                use_namespace: bool = True, backend: str = "auto",
                max_processes: int = 64) -> ExecResult:
    """Execute `source` as __main__ in a sandbox; exit status 0 means passed.

    backend: "auto" (bwrap when it works here, else the guard), "bwrap" (RuntimeError when it
    does not work here) or "guard". use_namespace=False: no namespaces at all, so the guard
    without `unshare --net` (the audit hook alone refuses the network). max_processes: tasks
    (processes and threads) the program may have at once under bwrap, itself included.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
    if max_processes < 2:
        raise ValueError("max_processes must be at least 2 (the program itself is one)")
    if backend == "bwrap" and not use_namespace:
        raise ValueError("the bwrap backend always uses namespaces (use_namespace=False)")
    if backend == "auto":
        backend = "bwrap" if use_namespace and bwrap_usable() else "guard"
    elif backend == "bwrap" and not bwrap_usable():
        raise RuntimeError(f"sandbox backend 'bwrap' does not work here: {bwrap_problem()}")
    with tempfile.TemporaryDirectory(prefix="hibari-sandbox-") as work:
        with open(os.path.join(work, "program.py"), "w", encoding="utf-8") as f:
            f.write(source)
        with open(os.path.join(work, "guard.py"), "w", encoding="utf-8") as f:
            f.write(GUARD)
        limits = [str(memory_mb * 1024 * 1024), str(int(timeout_s) + 1)]
        if backend == "bwrap":
            raw = _run_bwrap(work, GUARD, ["guard.py", *limits, "0"],
                             timeout_s=timeout_s, max_processes=max_processes)
            netns = True
            if not raw.reported:
                raw.stderr += (f"\nsandbox: bwrap ended without a report from its monitor "
                               f"(exit code {raw.returncode})")
        else:
            prefix = unshare_prefix() if use_namespace else ()
            raw = _run_guard(work, timeout_s, limits, prefix)
            netns = bool(prefix)
    return ExecResult(_status(raw), raw.returncode, raw.stderr[-2000:], netns, backend)


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The program HumanEval runs: prompt + completion, the tests, then check(entry_point)."""
    return f"{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n"
