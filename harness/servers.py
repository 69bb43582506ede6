"""The processes a test or a benchmark starts: `streamlit run` servers on free ports, a Ray
head as the README starts one, and their teardown (stop_group)."""
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
THREAD_LOG_ENV = "PEFT_THREAD_CPU_LOG"
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A running `streamlit run`: its URL, its process id, and what it costs in CPU."""
    url: str
    pid: int
    log: object = field(repr=False)
    thread_log: Path = None  # set when the server runs with thread_probe=True
    _offset: int = field(default=0, repr=False)
    _exited: dict = field(default_factory=dict, repr=False)
    script_runs: list = field(default_factory=list)  # (session, epoch s at exit, wall s) per exited thread

    def log_text(self):
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def cpu_seconds(self):
        """User + system CPU of the whole server process: every thread, running or exited."""
        return proc_cpu_seconds(f"/proc/{self.pid}/stat")

    def thread_cpu(self):
        """{ThreadKey: CPU seconds} of every thread the server started since it began, exited
        or alive. Needs thread_probe=True (names then reach /proc, and exited threads are
        logged with the Streamlit session they ran a script for)."""
        alive = {}
        for tid in os.listdir(f"/proc/{self.pid}/task"):
            try:
                name = Path(f"/proc/{self.pid}/task/{tid}/comm").read_text().strip()
                alive[ThreadKey(name, int(tid))] = proc_cpu_seconds(f"/proc/{self.pid}/task/{tid}/stat")
            except (OSError, ValueError):  # it exited meanwhile: the log has it below
                pass
        if self.thread_log:  # read on from where the last call stopped: the log only grows
            with open(self.thread_log, "rb") as f:
                f.seek(self._offset)
                for line in f.readlines():
                    if not line.endswith(b"\n"):
                        break  # half written: next time
                    self._offset += len(line)
                    name, tid, seconds, wall, ended, session = line.decode(errors="replace").rstrip("\n").rsplit("\t", 5)
                    if session:
                        self.script_runs.append((session, float(ended), float(wall)))
                    name = name.encode()[:15].decode(errors="ignore")  # as /proc shows it
                    alive.pop(ThreadKey(name, int(tid)), None)  # it exited after the listing above
                    self._exited[ThreadKey(name, int(tid), session, len(self._exited))] = float(seconds)
        return {**alive, **self._exited}


class ThreadKey(NamedTuple):
    name: str           # the Python thread's name, cut to 15 bytes as in /proc
    tid: int            # native thread id (reused by later threads, hence seq)
    session: str = ""   # for an exited ScriptRunner thread: the Streamlit session it ran for
    seq: int = 0        # for an exited thread: its line in the log


def proc_cpu_seconds(stat_path):
    """utime + stime from a /proc stat file (fields 14 and 15, after the parenthesised name)."""
    fields = Path(stat_path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _serve_with_thread_probe():
    """`python -c` entry of a server with thread_probe=True: Streamlit's own CLI, after every
    Python thread is given its name at the OS level (so /proc shows "run-1a2b3c4d",
    "ScriptRunner.sc", ...) and appends "name, native id, CPU s, wall s, epoch at exit,
    session" (tab-separated) to the file in $PEFT_THREAD_CPU_LOG when it exits. session: the
    Streamlit session id of a ScriptRunner thread, else empty; its wall seconds are a script
    run's server time. Costs one prctl and one small write per thread."""
    libc = ctypes.CDLL(None, use_errno=True)
    path = os.environ[THREAD_LOG_ENV]
    lock = threading.Lock()
    inner = threading.Thread._bootstrap_inner

    def bootstrap_inner(self):
        session = getattr(getattr(getattr(self, "_target", None), "__self__", None), "_session_id", "")
        try:
            libc.prctl(15, self.name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
        except Exception:
            pass
        began = time.perf_counter()
        try:
            inner(self)
        finally:
            line = (f"{self.name}\t{threading.get_native_id()}\t{time.thread_time():.6f}\t"
                    f"{time.perf_counter() - began:.6f}\t{time.time():.3f}\t{session}\n")
            with lock, open(path, "a") as f:
                f.write(line)

    threading.Thread._bootstrap_inner = bootstrap_inner
    from streamlit.web.cli import main
    main(prog_name="streamlit")


@contextlib.contextmanager
def streamlit_server(timeout=90, flags=(), thread_probe=False, env=None, executor=None):
    """Yield a Server for a fresh `streamlit run app.py` (extra command-line `flags` such as
    ["--runner.postScriptGC", "true"], extra environment `env`); kill it (and only it, with
    the local Ray it may have started) afterwards. `executor`: "ray" trains on Ray worker
    processes (RAY_ADDRESS from `env` or the environment, else a local Ray the app starts),
    "inprocess" in the server; None: as the environment says (PEFT_EXECUTOR)."""
    port = free_port()
    args = ["run", "app.py", "--server.headless", "true", "--server.port", str(port),
            "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false", *flags]
    env, thread_log = {**os.environ, **(env or {}), **({"PEFT_EXECUTOR": executor} if executor else {})}, None
    if thread_probe:
        fd, name = tempfile.mkstemp(prefix="peft-threads-", suffix=".tsv")
        os.close(fd)
        thread_log = Path(name)
        env[THREAD_LOG_ENV] = name
        cmd = [sys.executable, "-c", "from harness.servers import _serve_with_thread_probe as m; m()", *args]
    else:
        cmd = [sys.executable, "-m", "streamlit", *args]
    log = tempfile.TemporaryFile()  # a file, not a pipe: a chatty server never blocks on it
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"streamlit exited: {log.read().decode(errors='replace')[-2000:]}")
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                pass
            if time.time() > deadline:
                raise TimeoutError(f"streamlit did not answer on {url} within {timeout} s")
            time.sleep(0.5)
        yield Server(url, proc.pid, log, thread_log)
    finally:
        stop_group(proc)  # its own session: this group holds only the server (and a Ray it started)
        log.close()
        if thread_log:
            thread_log.unlink(missing_ok=True)


def wait_for_port(proc, port, timeout, what, why_exited, every=0.1):
    """Wait until `proc` (`what`) accepts a TCP connection on 127.0.0.1:`port`; RuntimeError
    naming why_exited() if it exits first, TimeoutError after `timeout` seconds."""
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited: {why_exited()}")
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            if time.time() > deadline:
                raise TimeoutError(f"{what} did not listen on 127.0.0.1:{port} within {timeout} s") from None
            time.sleep(every)


def stop_group(proc, grace=10, group=True):
    """Stop a process started in a session of its own: SIGTERM to its whole group (`group`) or
    to it alone, up to `grace` seconds to exit, then SIGKILL to whatever of the group is left."""
    with contextlib.suppress(ProcessLookupError):
        if group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


class RayHead(NamedTuple):
    address: str  # host:port, for RAY_ADDRESS
    pid: int      # `ray start`'s process: its group holds the whole local cluster


@contextlib.contextmanager
def ray_head(num_cpus=None, timeout=90, auth=True):
    """Yield a RayHead (address, pid) for a fresh single-node Ray as the README starts one
    (`ray start --head --block`, no dashboard, listening on 127.0.0.1 only, token auth) in its
    own process group, stopped (it only) afterwards: what several web servers of a lecture hall
    share (README: Run a lecture hall). Its token is a fresh one, in this process's
    RAY_AUTH_TOKEN while the head runs, so the web servers started meanwhile join it.
    auth=False: a head without token auth (the app must refuse it)."""
    port = free_port()
    num_cpus = num_cpus or len(os.sched_getaffinity(0))
    token = os.urandom(32).hex()
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: Ray's one-machine switch, without which it replaces
    # --node-ip-address=127.0.0.1 by the network address and listens on every interface; workers
    # at nice 0, not Ray's default 15 (they train beside the web servers on the same cores)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_worker_niceness": "0",
           "RAY_AUTH_MODE": "token" if auth else "disabled", "RAY_AUTH_TOKEN": token}
    proc = subprocess.Popen(["ray", "start", "--head", "--block", f"--port={port}", f"--num-cpus={num_cpus}",
                             "--include-dashboard=false", "--node-ip-address=127.0.0.1",
                             f"--temp-dir={tempfile.mkdtemp(prefix='ray-')}"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address, before = f"127.0.0.1:{port}", os.environ.get("RAY_AUTH_TOKEN")
    if auth:
        os.environ["RAY_AUTH_TOKEN"] = token
    try:
        # the head's GCS answers a TCP connect once it is up
        wait_for_port(proc, port, timeout, "`ray start --head`", lambda: f"exit code {proc.returncode}", every=0.5)
        yield RayHead(address, proc.pid)
    finally:
        # `ray start --block` alone: it stops its cluster on SIGTERM in ~3 s (the whole group at
        # once took 35 s: its processes died before it could drain them); then what is left
        stop_group(proc, grace=20, group=False)
        if auth and before is None:
            os.environ.pop("RAY_AUTH_TOKEN", None)
        elif auth:
            os.environ["RAY_AUTH_TOKEN"] = before


@contextlib.contextmanager
def app_server(timeout=90, flags=(), env=None):
    """Yield the base URL of a fresh `streamlit run app.py`; kill it (and only it) afterwards."""
    with streamlit_server(timeout, flags, env=env) as server:
        yield server.url
