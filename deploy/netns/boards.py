"""Simulated boards for tvmpipe: TVM's tracker and one ``tvmpipe-worker`` per network namespace.

``SimulatedBoards`` builds the namespaces with ``boards.sh`` (beside this file), starts TVM's
tracker in the tracker namespace and a ``tvmpipe-worker`` in each board namespace, registered
under that board's key, and waits until the tracker lists them all. ``close()`` ends every
process it started (process groups, then whatever is still inside its namespaces) and removes
every namespace, link and the bridge; it also runs when the ``with`` block fails.

    with SimulatedBoards(["big", "big", "little"]) as boards:
        with PipelineModule(lib, tracker=boards.tracker,
                            client_host=boards.controller_address) as pipe:
            ...
        boards.shape("b2", "8mbit")          # both directions of board 2's link
        boards.cut_link("b3"); boards.restore_link("b3")

Unlike boards: ``rates`` shapes each board's link, ``cpus`` gives each board a CPU quota in cores
(a cgroup v1 ``cpu`` group per board, ``tvmpipe-<prefix>-bK``, that its worker and the session
processes the worker forks run in; None: no limit):

    SimulatedBoards(["big", "little"], rates=["100mbit", "8mbit"], cpus=[1.0, 0.4])

Needs root, iproute2 (``ip``, ``tc``) and ``tornado`` (TVM's tracker imports it); ``cpus`` also
needs the cgroup v1 cpu controller (``cpu_cgroups_unavailable()`` says why not). Each instance
gets its own prefix and /24 so that runs can go on side by side; a set left behind by a run
that crashed (its process is gone) is removed when the next one starts.

By hand (keeps the boards up until Ctrl-C and prints how to reach them):

    sudo .venv/bin/python deploy/netns/boards.py --keys big,big,little --rate 20mbit \
        --cpu 1.0,1.0,0.4
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import itertools
import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil

from tvmpipe.orchestrator.localcluster import WITH_PARENT_BOOT

SCRIPT = Path(__file__).with_name("boards.sh")
TRACKER_PORT = 9190  # the tracker has its namespace to itself, so a fixed port is free
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 5.0
SUBNET_BASE = "10.77"
PREFIX_RE = re.compile(r"^(?:tvmpipe-)?tvp([0-9a-z]{5})[0-9a-z]{1,2}-(?:tr|br|b\d+)$")
# cgroup v1 cpu controller; boards.sh reads the same variable
CGROUP_CPU = Path(os.environ.get("TVMPIPE_CGROUP_CPU", "/sys/fs/cgroup/cpu"))
CFS_PERIOD_US = 10_000  # boards.sh's: see there
_counter = itertools.count()


class BoardsError(RuntimeError):
    """The simulated boards could not be stood up or torn down; the message says why."""


@dataclass
class Board:
    name: str  # b1, b2, ...
    namespace: str  # also the name of its link's end in the root namespace
    address: str
    key: str
    pid: int | None = None  # the tvmpipe-worker's
    port: int | None = None  # its RPC port
    rate: str | None = None  # its link's shaping at start (tc units), None: unshaped
    cpu: float | None = None  # its CPU quota in cores, None: no limit
    cgroup: Path | None = None  # its cpu cgroup (when started with a quota)


@dataclass
class _Child:
    what: str
    process: subprocess.Popen[bytes]
    log: IO[bytes]
    tree: set[int] = field(default_factory=set)

    def log_tail(self, limit: int = 2000) -> str:
        self.log.seek(0)
        text = self.log.read().decode(errors="replace").strip()
        return text[-limit:] or "(it printed nothing)"


def _b36(number: int, width: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while number:
        number, rest = divmod(number, 36)
        out = digits[rest] + out
    return out.rjust(width, "0")[-width:]


def _run(*args: str, check: bool = True) -> str:
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise BoardsError(f"{' '.join(args)} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def _script(*args: str, check: bool = True) -> str:
    return _run("bash", str(SCRIPT), *args, check=check)


def netns_unavailable() -> str | None:
    """Why simulated boards cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "simulated boards need root (network namespaces)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"simulated boards need iproute2's {tool!r}, which is not on PATH"
    try:
        import tornado  # noqa: F401
    except ImportError:
        return "TVM's tracker needs the 'tornado' package (pip install tornado)"
    probe = f"tvpprobe{os.getpid()}"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if done.returncode != 0:
        return f"'ip netns add' does not work here: {done.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def cpu_cgroups_unavailable() -> str | None:
    """Why boards cannot get CPU quotas here (no cgroup v1 cpu controller), or None if they can."""
    if not (CGROUP_CPU / "cpu.cfs_quota_us").is_file():
        return (
            f"CPU quotas for simulated boards need the cgroup v1 cpu controller at {CGROUP_CPU} "
            "(cpu.cfs_quota_us is missing; set TVMPIPE_CGROUP_CPU if it is mounted elsewhere)"
        )
    probe = CGROUP_CPU / f"tvmpipe-probe{os.getpid()}"
    try:
        probe.mkdir(exist_ok=True)
        (probe / "cpu.cfs_quota_us").write_text("50000")
    except OSError as error:
        return f"cannot make a CPU-limited cgroup under {CGROUP_CPU}: {error}"
    finally:
        with contextlib.suppress(OSError):
            probe.rmdir()
    return None


def remove_stale_sets() -> list[str]:
    """Remove the sets of runs whose process is gone (crashed or killed), their namespaces, links
    and cpu cgroups; returns their prefixes."""
    names = _run("ip", "netns", "list").split()
    names += [line.split(": ")[1].split("@")[0] for line in _run("ip", "-o", "link").splitlines()]
    with contextlib.suppress(OSError):
        names += [path.name for path in CGROUP_CPU.glob("tvmpipe-tvp*") if path.is_dir()]
    stale = set()
    for name in names:
        found = PREFIX_RE.match(name)
        if found and not psutil.pid_exists(int(found.group(1), 36)):
            stale.add(name.removeprefix("tvmpipe-").split("-")[0])
    for prefix in sorted(stale):
        _script("down", "--prefix", prefix)
    return sorted(stale)


def _free_subnet(start: int) -> str:
    routes = _run("ip", "-4", "route", "show")
    for step in range(256):
        subnet = f"{SUBNET_BASE}.{(start + step) % 256}"
        if f"{subnet}.0/24" not in routes:
            return subnet
    raise BoardsError(f"no free /24 left in {SUBNET_BASE}.0.0/16")


class SimulatedBoards:
    """Boards in network namespaces, a tracker, a worker per board; a context manager.

    ``keys[i]`` is the tracker key of board ``b{i+1}``. ``rate`` shapes every board's link at
    start, ``rates`` each board's (``rates[i]`` for ``b{i+1}``, None: unshaped); ``shape``
    changes one later. ``cpu`` limits every board to that many cores (0.4: 40 % of one core),
    ``cpus`` each board (None: no limit); ``set_cpu`` changes one later. With ``cpu``/``cpus``
    every board gets a cpu cgroup (a board with None one without a limit), and runs its worker,
    the worker's sessions and whatever ``spawn`` starts there in it.
    Attributes once started: ``tracker`` (host, port), ``controller_address`` (this machine on
    the boards' bridge: the pipeline's ``client_host``), ``boards`` (list of Board), ``prefix``
    and ``subnet``.
    """

    def __init__(
        self,
        keys: Sequence[str],
        *,
        rate: str | None = None,
        rates: Sequence[str | None] | None = None,
        cpu: float | None = None,
        cpus: Sequence[float | None] | None = None,
        prefix: str | None = None,
        subnet: str | None = None,
        ready_timeout: float = READY_TIMEOUT_S,
        python: str = sys.executable,
    ):
        if not keys:
            raise ValueError("SimulatedBoards needs at least one board key")
        self.keys = list(keys)
        self.rate = rate
        self.rates = _per_board("rate", rate, rates, len(self.keys))
        self.cpus = _per_board("cpu", cpu, cpus, len(self.keys))
        for share in self.cpus:
            if share is not None and not 0.1 <= share <= 1024:
                raise ValueError(f"a board's cpu share is in cores, 0.1 or more: got {share}")
        self.prefix = prefix or f"tvp{_b36(os.getpid(), 5)}{_b36(next(_counter), 1)}"
        self._subnet = subnet
        self.ready_timeout = ready_timeout
        self.python = python
        self.subnet = ""
        self.controller_address = ""
        self.tracker: tuple[str, int] = ("", 0)
        self.boards: list[Board] = []
        self._children: list[_Child] = []
        self._state = "new"

    # ----- lifetime
    def __enter__(self) -> SimulatedBoards:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> SimulatedBoards:
        if self._state != "new":
            raise BoardsError(f"these boards are {self._state}; make a new SimulatedBoards")
        self._state = "started"
        atexit.register(self.close)
        try:
            if any(share is not None for share in self.cpus):
                reason = cpu_cgroups_unavailable()
                if reason:
                    raise BoardsError(reason)
            remove_stale_sets()
            _script("down", "--prefix", self.prefix)  # a leftover with our own prefix
            self._up()
            self._start_tracker()
            self._start_workers()
            self.wait_free()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """End every process started here, then remove the namespaces, links and bridge."""
        if self._state in ("new", "closed"):
            self._state = "closed"
            return
        self._state = "closed"
        atexit.unregister(self.close)
        problems = []
        for child in reversed(self._children):
            if not self._stop_child(child):
                problems.append(f"{child.what} (pid {child.process.pid}) would not stop")
        down = subprocess.run(
            ["bash", str(SCRIPT), "down", "--prefix", self.prefix], capture_output=True, text=True
        )
        if down.returncode != 0:
            problems.append(down.stderr.strip())
        left = [
            pid
            for child in self._children
            for pid in child.tree | {child.process.pid}
            if _alive(pid)
        ]
        if left:
            problems.append(f"processes still running: {left}")
        for child in self._children:
            child.log.close()
        self._children = []
        if problems:
            raise BoardsError("tearing down the simulated boards: " + "; ".join(problems))

    # ----- links
    def board(self, which: str | int | Board) -> Board:
        """A board by Board, name ("b2") or 1-based number."""
        if isinstance(which, Board):
            return which
        name = f"b{which}" if isinstance(which, int) else which
        for board in self.boards:
            if board.name == name:
                return board
        raise KeyError(f"no board {which!r}; boards: {[b.name for b in self.boards]}")

    def shape(
        self,
        which: str | int | Board,
        rate: str,
        burst: str | None = None,
        latency: str | None = None,
    ) -> None:
        """Limit a board's link to ``rate`` (tc units: 8mbit) in both directions with tbf."""
        extra = ["--burst", burst] if burst else []
        extra += ["--latency", latency] if latency else []
        _script("shape", self.board(which).name, rate, "--prefix", self.prefix, *extra)

    def unshape(self, which: str | int | Board) -> None:
        _script("unshape", self.board(which).name, "--prefix", self.prefix)

    def set_cpu(self, which: str | int | Board, share: float | None) -> None:
        """Limit a board to ``share`` cores (None: no limit). A board started without a quota
        gets its cgroup now, and the processes running in it are moved there."""
        board = self.board(which)
        _script("cpu", board.name, _share_arg(share), "--prefix", self.prefix)
        board.cpu = share
        board.cgroup = CGROUP_CPU / f"tvmpipe-{board.namespace}"

    def cpu_stat(self, which: str | int | Board) -> dict[str, int]:
        """The board cgroup's ``cpu.stat``: nr_periods, nr_throttled, throttled_time (ns)..."""
        cgroup = self.board(which).cgroup
        if cgroup is None:
            raise BoardsError(f"board {self.board(which).name} has no CPU quota (no cgroup)")
        return {
            name: int(value)
            for name, value in (
                line.split() for line in (cgroup / "cpu.stat").read_text().splitlines()
            )
        }

    def cgroup_pids(self, which: str | int | Board) -> set[int]:
        """The processes in the board's cpu cgroup (empty without one)."""
        cgroup = self.board(which).cgroup
        if cgroup is None:
            return set()
        return {int(pid) for pid in (cgroup / "cgroup.procs").read_text().split()}

    def cut_link(self, which: str | int | Board) -> None:
        """Take the board's link down (both ends): the board is unreachable until restored."""
        _script("cut", self.board(which).name, "--prefix", self.prefix)

    def restore_link(self, which: str | int | Board) -> None:
        _script("restore", self.board(which).name, "--prefix", self.prefix)

    def link_bytes(self, which: str | int | Board) -> dict[str, int]:
        """Bytes on the board's link so far: ``to_board`` and ``from_board`` (whole frames)."""
        link = Path("/sys/class/net", self.board(which).namespace, "statistics")
        return {
            "to_board": int((link / "tx_bytes").read_text()),
            "from_board": int((link / "rx_bytes").read_text()),
        }

    def controller_bytes(self) -> dict[str, int]:
        """Bytes this machine (controller_address) sent to and received from the subnet.

        The bridge device counts only frames to or from the root namespace's own address:
        frames that go board to board are forwarded by the bridge and never appear here.
        """
        link = Path("/sys/class/net", f"{self.prefix}-br", "statistics")
        return {
            "sent": int((link / "tx_bytes").read_text()),
            "received": int((link / "rx_bytes").read_text()),
        }

    def spawn(
        self, which: str | int | Board | None, argv: Sequence[str], *, stdout_pipe: bool = False
    ) -> subprocess.Popen[bytes]:
        """Start a command inside a board (None: the tracker's namespace); stopped by close().

        It runs in the board's cpu cgroup, if the board has a CPU quota. ``stdout_pipe``: its
        standard output is ``process.stdout`` (else, like its standard error, a log file)."""
        namespace = f"{self.prefix}-tr" if which is None else self.board(which).namespace
        what = f"{argv[0]} in {namespace}"
        return self._spawn(what, namespace, argv, stdout_pipe=stdout_pipe).process

    # ----- start-up steps
    def _up(self) -> None:
        attempts = 0
        start = os.getpid() % 256 if self._subnet is None else 0
        while True:
            self.subnet = self._subnet or _free_subnet(start)
            _script(
                "up",
                str(len(self.keys)),
                "--prefix",
                self.prefix,
                "--subnet",
                self.subnet,
                *(["--rate", ",".join(r or "none" for r in self.rates)] if any(self.rates) else []),
                *(
                    ["--cpu", ",".join(_share_arg(c) for c in self.cpus)]
                    if any(c is not None for c in self.cpus)
                    else []
                ),
            )
            # Another run may have taken the same /24 at the same moment: then pick another.
            routes = _run("ip", "-4", "route", "show", f"{self.subnet}.0/24").splitlines()
            if len(routes) == 1 or self._subnet is not None or attempts >= 5:
                break
            _script("down", "--prefix", self.prefix)
            attempts += 1
            start += 17
        self.controller_address = f"{self.subnet}.1"
        self.tracker = (f"{self.subnet}.2", TRACKER_PORT)
        limited = any(share is not None for share in self.cpus)  # then every board has a cgroup
        self.boards = [
            Board(
                f"b{i}",
                f"{self.prefix}-b{i}",
                f"{self.subnet}.{10 + i}",
                key,
                rate=rate,
                cpu=share,
                cgroup=CGROUP_CPU / f"tvmpipe-{self.prefix}-b{i}" if limited else None,
            )
            for i, (key, rate, share) in enumerate(
                zip(self.keys, self.rates, self.cpus, strict=True), start=1
            )
        ]

    def _spawn(
        self, what: str, namespace: str, argv: Sequence[str], *, stdout_pipe: bool = False
    ) -> _Child:
        """Start ``argv`` in ``namespace`` (and its board's cpu cgroup, if it has one: ``boards.sh
        exec`` joins it before it execs, so the pid is the command's) in a process group of its own.

        Its standard input is a pipe that stays open while this process lives: commands that
        watch it (tvmpipe-worker --exit-with-parent, WITH_PARENT_BOOT) end when this process dies.
        """
        log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        process = subprocess.Popen(
            ["bash", str(SCRIPT), "exec", "--prefix", self.prefix, namespace.split("-")[1], *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE if stdout_pipe else log,
            stderr=log,
            start_new_session=True,  # close() ends the whole group, session processes included
        )
        child = _Child(what, process, log)
        self._children.append(child)
        return child

    def _start_tracker(self) -> None:
        host, port = self.tracker
        argv = [self.python, "-c", WITH_PARENT_BOOT, "tvm.exec.rpc_tracker", "--host", "0.0.0.0"]
        argv += ["--port", str(port), "--port-end", str(port + 1), "--silent"]
        child = self._spawn("the tracker", f"{self.prefix}-tr", argv)
        deadline = time.monotonic() + self.ready_timeout
        while True:
            if child.process.poll() is not None:
                raise BoardsError(f"TVM's tracker exited during start-up: {child.log_tail()}")
            try:
                with socket.create_connection((host, port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise BoardsError(
                        f"TVM's tracker did not listen on {host}:{port} within "
                        f"{self.ready_timeout:.0f} s: {child.log_tail()}"
                    ) from None
                time.sleep(0.05)

    def _start_workers(self) -> None:
        host, port = self.tracker
        started = []
        for board in self.boards:
            argv = [self.python, "-m", "tvmpipe.worker", "--host", board.address]
            argv += ["--port", "9090", "--tracker", f"{host}:{port}", "--key", board.key]
            argv += ["--custom-addr", board.address, "--exit-with-parent", "--silent"]
            what = f"the worker of {board.name}"
            started.append((board, self._spawn(what, board.namespace, argv, stdout_pipe=True)))
        deadline = time.monotonic() + self.ready_timeout
        for board, child in started:
            board.pid = child.process.pid
            board.port = _read_ready_line(child, deadline)

    def wait_free(self, timeout: float | None = None) -> None:
        """Wait until the tracker lists every board's worker as free (after sessions ended)."""
        from tvm import rpc

        timeout = self.ready_timeout if timeout is None else timeout
        wanted = {key: self.keys.count(key) for key in self.keys}
        deadline = time.monotonic() + timeout
        free: dict[str, int] = {}
        while time.monotonic() < deadline:
            tracker = rpc.connect_tracker(*self.tracker)
            try:
                queue = tracker.summary()["queue_info"]
            finally:
                tracker.close()
            free = {key: int(queue.get(key, {}).get("free", 0)) for key in wanted}
            if free == wanted:
                return
            time.sleep(0.1)
        raise BoardsError(
            f"the tracker lists free workers {free}, expected {wanted}, after {timeout:.0f} s "
            f"(is a PipelineModule or another RPC session still holding them?): "
            + " | ".join(f"{c.what}: {c.log_tail(500)}" for c in self._children)
        )

    def _stop_child(self, child: _Child) -> bool:
        """End the child's process group; True once it and every process it started are gone."""
        process = child.process
        with contextlib.suppress(psutil.Error):
            child.tree |= {p.pid for p in psutil.Process(process.pid).children(recursive=True)}
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, sig)
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                continue
            _, alive = psutil.wait_procs(
                [p for p in _processes(child.tree)], timeout=STOP_TIMEOUT_S
            )
            if not alive:
                return True
        return not any(_alive(pid) for pid in child.tree | {process.pid})


def _per_board(what: str, every: Any, each: Sequence[Any] | None, count: int) -> list[Any]:
    """The per-board list from a value for every board or a list with one per board."""
    if each is None:
        return [every] * count
    if every is not None:
        raise ValueError(f"give {what} (every board) or {what}s (each board), not both")
    if len(each) != count:
        raise ValueError(f"{what}s has {len(each)} values for {count} boards")
    return list(each)


def _share_arg(share: float | None) -> str:
    return "none" if share is None else f"{share:g}"


def _processes(pids: set[int]) -> list[psutil.Process]:
    found = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            found.append(psutil.Process(pid))
    return found


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _read_ready_line(child: _Child, deadline: float) -> int:
    """The port from the worker's ``tvmpipe-worker ready HOST:PORT`` line."""
    stdout = child.process.stdout
    assert stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if selector.select(timeout=0.2):
                line = stdout.readline().decode(errors="replace")
                if line.startswith("tvmpipe-worker ready"):
                    return int(line.rsplit(":", 1)[1])
                if not line:
                    break
            if child.process.poll() is not None:
                break
    raise BoardsError(f"{child.what} did not report ready: {child.log_tail()}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Stand up simulated boards until Ctrl-C.")
    parser.add_argument("--keys", default="big,big,little", help="tracker key per board")
    parser.add_argument(
        "--rate", help="shape the links: one rate for every board or one each, e.g. 20mbit,5mbit"
    )
    parser.add_argument(
        "--cpu",
        help="CPU quota in cores: one for every board or one each (none: no limit), e.g. 1.0,0.4",
    )
    parser.add_argument("--prefix", help="names of the namespaces and links (1-10 of [a-z0-9])")
    args = parser.parse_args(argv)
    reason = netns_unavailable()
    if reason:
        parser.exit(1, f"{reason}\n")
    keys = args.keys.split(",")

    def each(text: str | None, parse: Any) -> list[Any] | None:
        if text is None:
            return None
        values = [None if v in ("", "none") else parse(v) for v in text.split(",")]
        if len(values) == 1:
            return values * len(keys)
        if len(values) != len(keys):
            parser.error(f"{text!r}: give one value, or one per board ({len(keys)})")
        return values

    try:
        rates, cpus = each(args.rate, str), each(args.cpu, float)
    except ValueError as error:
        parser.error(str(error))
    if cpus and any(c is not None for c in cpus):
        reason = cpu_cgroups_unavailable()
        if reason:
            parser.exit(1, f"{reason}\n")
    with SimulatedBoards(keys, rates=rates, cpus=cpus, prefix=args.prefix) as boards:
        host, port = boards.tracker
        print(f"tracker {host}:{port}   controller (client_host) {boards.controller_address}")
        for board in boards.boards:
            print(
                f"{board.name}  {board.address}  key={board.key}  worker pid {board.pid}  "
                f"link {board.rate or 'unshaped'}  cpu {_share_arg(board.cpu)}"
            )
        print("Ctrl-C to tear everything down.", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            while True:
                time.sleep(3600)


if __name__ == "__main__":
    main()
