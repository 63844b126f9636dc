"""The systems under test: start them on 127.0.0.1, measure their processes, stop them.

Every system is a set of OS processes. ``sample()`` sums CPU time (user + system, all
threads) and RSS over all of them with psutil; the orchestrator takes one sample right
before a measured window and one right after, so the difference is exactly what the
servers spent on that window's traffic.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
PYTHON = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").exists() else sys.executable
# Beside the interpreter: a checkout without its own .venv runs with another one's.
SIGNALPOST = str(Path(PYTHON).parent / "signalpost")
SOCKETIO_DIR = ROOT / "bench" / "socketio"
LOG_DIR = ROOT / "bench" / "results" / "logs"

#: A long, fixed benchmark secret (PyJWT warns under 32 bytes).
JWT_SECRET = "signalpost-bench-secret-0123456789abcdef"


class Unavailable(RuntimeError):
    """A system could not be started (e.g. ``signalpost cluster`` is not built yet)."""


@dataclass(frozen=True, slots=True)
class Sample:
    """Servers' CPU seconds (user+system) and RSS bytes, summed over processes, at ``t``."""

    t: float
    cpu: float
    rss: int
    processes: int
    host_busy: float = 0.0  # CPU seconds the whole machine spent busy (all processes)
    host_steal: float = 0.0  # CPU seconds the hypervisor took away


class LineReader:
    """Drains a child's stdout in a thread, so the pipe never blocks it."""

    def __init__(self, stream: IO[str], echo: IO[str] | None = None) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._echo = echo
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            if self._echo is not None:
                self._echo.write(line)
                self._echo.flush()
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def next(self, timeout: float) -> str | None:
        """The next line; ``None`` at end of stream; ``TimeoutError`` after ``timeout``."""
        try:
            return self.lines.get(timeout=max(0.0, timeout))
        except queue.Empty:
            raise TimeoutError(f"no output within {timeout:.0f}s") from None

    def wait_for(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            line = self.next(deadline - time.monotonic())
            if line is None:
                raise Unavailable(f"exited before printing {prefix!r}")
            if line.startswith(prefix):
                return line


@dataclass(slots=True)
class System:
    """One running system under test."""

    name: str
    label: str
    urls: list[str]
    proc: subprocess.Popen[str]
    proto: str = "sp"
    state_file: Path | None = None
    tree: bool = False  # measure the whole process tree of ``proc`` (cluster)
    extra_pids: list[int] = field(default_factory=list)
    #: processes started beside ``proc``: measured with it, stopped before it
    companions: list[subprocess.Popen[str]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    _procs: dict[int, psutil.Process] = field(default_factory=dict)

    def processes(self) -> list[psutil.Process]:
        pids = [self.proc.pid, *(c.pid for c in self.companions), *self.extra_pids]
        if self.tree:
            # the supervisor's children, refreshed at each sample
            with contextlib.suppress(psutil.Error):
                pids += [c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)]
        out = []
        for pid in dict.fromkeys(pids):
            process = self._procs.get(pid)
            if process is None:
                try:
                    process = self._procs[pid] = psutil.Process(pid)
                except psutil.Error:
                    continue
            out.append(process)
        return out

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes()]

    def sample(self) -> Sample:
        cpu, rss, n = 0.0, 0, 0
        for process in self.processes():
            try:
                with process.oneshot():
                    times = process.cpu_times()
                    cpu += times.user + times.system
                    rss += process.memory_info().rss
                    n += 1
            except psutil.Error:
                continue
        host = psutil.cpu_times()
        busy = host.user + host.system + getattr(host, "nice", 0.0) + getattr(host, "irq", 0.0)
        busy += getattr(host, "softirq", 0.0)
        return Sample(time.monotonic(), cpu, rss, n, busy, getattr(host, "steal", 0.0))

    def alive(self) -> bool:
        return all(p.poll() is None for p in (self.proc, *self.companions))

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (graceful drain), then SIGKILL whatever is left; companions first."""
        for proc in (*self.companions, self.proc):
            _terminate(proc, timeout)


def _terminate(proc: subprocess.Popen[str], timeout: float) -> None:
    """SIGTERM ``proc``, SIGKILL it after ``timeout``, then SIGKILL what is left of its tree."""
    if proc.poll() is not None:
        return
    children = []
    with contextlib.suppress(psutil.Error):
        children = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.kill()


def _log(name: str) -> IO[str]:
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    return open(LOG_DIR / f"{name}.log", "a")


def server_env(capacity: int = 2, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for every server: the bench secret, no rate limits or connection caps,
    the room capacity."""
    env = dict(os.environ)
    env.update(
        SIGNALPOST_JWT_SECRET=JWT_SECRET,
        SIGNALPOST_RATE_PER_SECOND="1000000000",
        SIGNALPOST_RATE_BURST="1000000000",
        # Admission: the load generators open thousands of connections at once as one
        # user (the per-IP cap spares loopback already); the bench measures the rest.
        SIGNALPOST_MAX_SESSIONS_PER_USER="1000000000",
        SIGNALPOST_ACCEPT_RATE="1000000000",
        SIGNALPOST_ACCEPT_BURST="1000000000",
        SIGNALPOST_ROOM_CAPACITY=str(capacity),
        PYTHONUNBUFFERED="1",
        JWT_SECRET=JWT_SECRET,
        ROOM_CAPACITY=str(capacity),
    )
    env.update(extra or {})
    return env


def _spawn(
    name: str, argv: Sequence[str], env: dict[str, str], cwd: Path = ROOT
) -> tuple[subprocess.Popen[str], LineReader]:
    log = _log(name)
    log.write(f"\n=== {time.strftime('%H:%M:%S')} {' '.join(argv)}\n")
    log.flush()
    proc = subprocess.Popen(
        list(argv),
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        start_new_session=True,
    )
    return proc, LineReader(proc.stdout, echo=log)  # type: ignore[arg-type]


def start_floor(capacity: int = 2, coalesce: bool = False) -> System:
    argv = [PYTHON, "-m", "bench.floor_relay", "--port", "0"]
    if coalesce:
        argv.append("--coalesce")
    proc, out = _spawn("floor", argv, server_env(capacity))
    try:
        line = out.wait_for("floor relay:", 20)
    except (Unavailable, TimeoutError) as exc:
        proc.kill()
        raise Unavailable(f"floor relay: {exc}") from None
    if coalesce:
        return System(
            "floor-coalesce", "floor F + coalesced writes (experiment)", [line.split()[-1]], proc
        )
    return System("floor", "floor F", [line.split()[-1]], proc)


def start_floor_coalesce(capacity: int = 2) -> System:
    return start_floor(capacity, coalesce=True)


def start_floor_sansio(capacity: int = 2) -> System:
    """The floor's logic on websockets' sans-I/O core with an asyncio.Protocol shell."""
    argv = [PYTHON, "-m", "bench.experiments.sansio_relay", "--port", "0"]
    proc, out = _spawn("floor-sansio", argv, server_env(capacity))
    try:
        line = out.wait_for("floor relay:", 20)
    except (Unavailable, TimeoutError) as exc:
        proc.kill()
        raise Unavailable(f"sans-I/O relay: {exc}") from None
    return System(
        "floor-sansio",
        "floor logic, sans-I/O shell + coalesced writes (experiment)",
        [line.split()[2]],
        proc,
    )


def start_dev(capacity: int = 2, variant: str = "") -> System:
    """``signalpost dev``; ``variant`` names an experiment (see ``DEV_VARIANTS``)."""
    argv = [PYTHON, SIGNALPOST, "--log-level", "WARNING", "dev"]
    argv += ["--host", "127.0.0.1", "--port", "0"]
    label, extra = DEV_VARIANTS[variant]
    proc, out = _spawn("dev", argv, server_env(capacity, extra))
    try:
        line = out.wait_for("signalpost dev:", 30)
    except (Unavailable, TimeoutError) as exc:
        proc.kill()
        raise Unavailable(f"signalpost dev: {exc}") from None
    return System(f"dev-{variant}" if variant else "dev", label, [line.split()[-1]], proc)


#: Experiments on an unchanged ``signalpost dev``: settings or interpreter options only.
DEV_VARIANTS: dict[str, tuple[str, dict[str, str]]] = {
    "": ("signalpost dev", {}),
    "history32": (
        "signalpost dev, history_max_events=32 (experiment)",
        {"SIGNALPOST_HISTORY_MAX_EVENTS": "32"},
    ),
    "gc": (
        "signalpost dev, lazier GC thresholds (experiment)",
        {"PYTHONPATH": str(ROOT / "bench" / "experiments" / "gc_tuned")},
    ),
}


def _npm_ci() -> None:
    """``npm ci`` in bench/socketio unless its node_modules are already complete."""
    wanted = ("socket.io", "@socket.io/redis-adapter", "redis")
    if all((SOCKETIO_DIR / "node_modules" / name).exists() for name in wanted):
        return
    install = subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund"],
        cwd=SOCKETIO_DIR,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if install.returncode != 0:
        raise Unavailable(f"npm ci failed: {install.stderr.strip()[-300:]}")


def _start_socketio_node(name: str, env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    """One ``node server.js`` on a free port; (process, its WebSocket URL)."""
    proc, out = _spawn(name, ["node", "server.js"], env | {"PORT": "0"}, cwd=SOCKETIO_DIR)
    try:
        line = out.wait_for("socket.io signaling:", 30)
    except (Unavailable, TimeoutError) as exc:
        proc.kill()
        raise Unavailable(f"socket.io server: {exc}") from None
    return proc, line.split()[-1] + "?EIO=4&transport=websocket"


def start_socketio(capacity: int = 2) -> System:
    _npm_ci()
    proc, url = _start_socketio_node("socketio", server_env(capacity))
    return System("socketio", "Socket.IO (Node)", [url], proc, proto="sio")


def start_socketio_redis(capacity: int = 2, nodes: int = 2) -> System:
    """Socket.IO scaled out: ``nodes`` processes of server.js sharing rooms through
    @socket.io/redis-adapter over a redis-server of their own; all of them measured.

    The load generator puts client ``i`` on ``urls[i % 2]``, so a call's two peers (and a
    relay pair) sit on different processes and every signal crosses Redis. A missing
    ``redis-server`` is an error, not a skip: CI must not pass without this baseline.
    """
    redis = start_redis()  # first: its absence fails the run even where npm would skip
    companions: list[subprocess.Popen[str]] = []
    try:
        _npm_ci()
        env = server_env(capacity, {"REDIS_URL": redis.info["url"]})
        urls = []
        for i in range(nodes):
            proc, url = _start_socketio_node(f"socketio-redis-{i + 1}", env)
            companions.append(proc)
            urls.append(url)
    except BaseException:
        for proc in companions:
            _terminate(proc, 5)
        redis.stop()
        raise
    return System(
        "socketio-redis",
        f"Socket.IO, {nodes} processes + Redis adapter (Node)",
        urls,
        redis.proc,
        proto="sio",
        companions=companions,
        info=redis.info,
    )


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the caller retries if it is taken first)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def start_redis(timeout: float = 10.0) -> System:
    """A throw-away ``redis-server`` on a free 127.0.0.1 port: no persistence, no service.

    ``RuntimeError`` (not ``Unavailable``) when the binary is missing: the Debian package
    ``redis-server`` is installed by scripts/setup.sh, so its absence is a broken set-up.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError(
            "redis-server is not installed (Debian package redis-server; scripts/setup.sh)"
        )
    for _attempt in range(3):
        port = free_port()
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1"]
        argv += ["--save", "", "--appendonly", "no", "--loglevel", "warning"]
        proc, _out = _spawn("redis", argv, server_env())
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            if _redis_ping(port):
                url = f"redis://127.0.0.1:{port}"
                return System("redis", "redis-server", [url], proc, info={"url": url})
            time.sleep(0.05)
        _terminate(proc, 5)  # exited (port taken meanwhile) or never answered: try again
    raise RuntimeError(f"redis-server did not start: {_tail(LOG_DIR / 'redis.log')}")


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), 0.5) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def start_cluster(capacity: int = 2, edges: int = 2, timeout: float = 45.0) -> System:
    """``signalpost cluster --edges N --brokers 1``; ``Unavailable`` with the reason if not."""
    state = LOG_DIR / f"cluster-state-{os.getpid()}-{time.monotonic_ns()}.json"
    state.parent.mkdir(parents=True, exist_ok=True)
    argv = [
        PYTHON,
        SIGNALPOST,
        "--log-level",
        "WARNING",
        "cluster",
        "--edges",
        str(edges),
        "--brokers",
        "1",
        "--state",
        str(state),
        "--consul",
        "off",
    ]
    proc, _out = _spawn("cluster", argv, server_env(capacity))
    deadline = time.monotonic() + timeout
    urls: list[str] = []
    document: dict[str, Any] = {}
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = _tail(LOG_DIR / "cluster.log")
            raise Unavailable(f"`signalpost cluster` exited with {proc.returncode}: {tail}")
        with contextlib.suppress(OSError, ValueError):
            document = json.loads(state.read_text())
            urls = [
                p["url"]
                for p in document.get("processes", [])
                if p.get("kind") == "edge" and p.get("url")
            ]
        if len(urls) >= edges and all(_accepts(u) for u in urls):
            break
        time.sleep(0.2)
    else:
        proc.kill()
        _kill_tree(proc.pid)
        raise Unavailable(f"`signalpost cluster` gave no {edges} live edges in {timeout:.0f}s")
    urls = [u if u.endswith("/v1/signal") else u.rstrip("/") + "/v1/signal" for u in urls]
    system = System(
        "cluster",
        f"signalpost cluster ({edges} edges + broker)",
        urls,
        proc,
        state_file=state,
        tree=True,
        info=document,
    )
    system.extra_pids = [int(p["pid"]) for p in document.get("processes", []) if p.get("pid")]
    # Give the edges' backplane a moment to see the broker and presence heartbeats.
    time.sleep(1.5)
    return system


def _accepts(url: str) -> bool:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), 0.5):
            return True
    except OSError:
        return False


def _kill_tree(pid: int) -> None:
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.kill()


def _tail(path: Path, chars: int = 400) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return " ".join(text[-chars:].split())


STARTERS = {
    "floor": start_floor,
    "floor-coalesce": start_floor_coalesce,
    "floor-sansio": start_floor_sansio,
    "dev": start_dev,
    "cluster": start_cluster,
    "dev-history32": lambda capacity=2: start_dev(capacity, "history32"),
    "dev-gc": lambda capacity=2: start_dev(capacity, "gc"),
    "socketio": start_socketio,
    "socketio-redis": start_socketio_redis,
}


@contextlib.contextmanager
def running(name: str, capacity: int = 2) -> Iterator[System]:
    """Start system ``name``, yield it, always stop it."""
    system = STARTERS[name](capacity)
    try:
        yield system
    finally:
        system.stop()


# --------------------------------------------------------------------------- generator


@dataclass(slots=True)
class GeneratorRun:
    """A finished load-generator run and the server samples taken at its checkpoints."""

    result: dict[str, Any]
    samples: dict[str, Sample]
    returncode: int

    def window(self, start: str = "measure", end: str = "done") -> tuple[float, float, int]:
        """(server CPU seconds, wall seconds, RSS delta) between two checkpoints."""
        a, b = self.samples[start], self.samples[end]
        return b.cpu - a.cpu, b.t - a.t, b.rss - a.rss


def run_generator(
    system: System, workload: str, options: Sequence[str], timeout: float
) -> GeneratorRun:
    """Run ``bench.loadgen`` against ``system``; sample the servers at READY and DONE."""
    argv = [
        PYTHON,
        "-m",
        "bench.loadgen",
        workload,
        "--proto",
        system.proto,
        "--secret",
        JWT_SECRET,
        "--timeout",
        str(timeout),
    ]
    for url in system.urls:
        argv += ["--url", url]
    argv += list(options)
    log = _log("loadgen")
    log.write(f"\n=== {time.strftime('%H:%M:%S')} {system.name}: {' '.join(argv[2:])}\n")
    log.flush()
    proc = subprocess.Popen(
        argv,
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        start_new_session=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    out = LineReader(proc.stdout)
    samples: dict[str, Sample] = {}
    result: dict[str, Any] = {}
    deadline = time.monotonic() + timeout + 30
    try:
        while True:
            line = out.next(deadline - time.monotonic())
            if line is None:
                break
            if line.startswith("READY"):
                phase = line.split(maxsplit=1)[1] if " " in line else "measure"
                samples[phase] = system.sample()
                proc.stdin.write("GO\n")
                proc.stdin.flush()
            elif line == "DONE":
                samples["done"] = system.sample()
            elif line.startswith("RESULT "):
                result = json.loads(line[len("RESULT ") :])
        returncode = proc.wait(30)
    except (TimeoutError, subprocess.TimeoutExpired):
        proc.kill()
        proc.wait(5)
        returncode = -9
    finally:
        with contextlib.suppress(OSError):
            proc.stdin.close()
    if returncode != 0 or not result:
        tail = _tail(LOG_DIR / "loadgen.log", 600)
        raise RuntimeError(f"loadgen {workload} on {system.name} failed ({returncode}): {tail}")
    return GeneratorRun(result, samples, returncode)
