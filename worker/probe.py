"""Link, memory and CPU probes, called by the planner through tvm.rpc (orchestrator/measure.py).

A link is timed over ZeroMQ, like the data plane it stands for, and on the sender's clock only,
so that boards whose clocks disagree still measure right. The receiving side (``sink``) binds a
ROUTER in a thread of its RPC session and echoes small pings; the sending side (``send``, on
another worker or in the controller) connects a DEALER and:

- times ``pings`` round trips of a 64-byte message: latency is half the median round trip;
- sends ``count`` messages of ``size`` bytes back to back and waits for the sink's one ack
  after the last: bandwidth is the bytes over (that time - one round trip).

Both sides also count the CPU time their process spent moving the bytes (ZeroMQ's I/O thread
included): on a board with a CPU quota, the data plane's CPU comes out of the stage's share.

A probe is secured like the data plane it stands for (proto/security.py): the controller makes a
keyring of two parties, ``probe-sender`` and ``probe-sink``, and gives each its share in the
request (``security``). The sink admits only the sender, with the mechanism the data plane would
use at its address (CURVE encrypts, PLAIN on loopback only authenticates), so that an outsider
can neither skew the figures nor end a probe early; it reports the mechanism and how many
connections it refused.

Every wait is bounded by ``timeout``; sockets close and contexts end in ``finally``.
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import zmq

from tvmpipe.proto.security import CURVE, Guard

PING = b"p"
DATA = b"d"
ACK = b"a"
PING_BYTES = 64
ACK_LINGER_MS = 1000  # the sink's ack must leave before its socket closes
SENDER, SINK = "probe-sender", "probe-sink"  # the two parties of a probe's keyring

_sinks: dict[str, tuple[threading.Thread, dict[str, Any]]] = {}


def _hosts() -> tuple[str, str]:
    """This worker's bind and advertised hosts (loopback in the controller)."""
    from .server import WorkerState

    return WorkerState.bind_host, WorkerState.advertise_host


def sink(request_json: str) -> str:
    """Bind a ROUTER that admits only the request's sender, answer it in a thread; returns
    ``{"id", "address", "mechanism", "encrypted"}``."""
    request = json.loads(request_json)
    count, timeout = int(request["count"]), float(request.get("timeout", 10.0))
    share = request.get("security")
    if not isinstance(share, dict):
        raise ValueError("the probe request has no security share: the controller is older")
    bind_host, advertise_host = _hosts()
    context = zmq.Context()
    guard = Guard(context, share)
    sock = context.socket(zmq.ROUTER)
    try:
        sock.setsockopt(zmq.LINGER, ACK_LINGER_MS)
        address = f"tcp://{advertise_host}"
        mech = guard.serve(sock, [SENDER], address)
        port = sock.bind_to_random_port(f"tcp://{bind_host}")
    except BaseException:
        sock.close(0)
        guard.close()
        context.term()
        raise
    stats: dict[str, Any] = {"messages": 0, "bytes": 0, "pings": 0, "done": False}
    thread = threading.Thread(
        target=_serve_sink,
        args=(context, guard, sock, count, time.monotonic() + timeout, stats),
        name="tvmpipe-probe-sink",
        daemon=True,
    )
    probe_id = uuid.uuid4().hex
    _sinks[probe_id] = (thread, stats)
    thread.start()
    return json.dumps(
        {
            "id": probe_id,
            "address": f"{address}:{port}",
            "mechanism": mech,
            "encrypted": mech == CURVE,
        }
    )


def _serve_sink(
    context: zmq.Context,
    guard: Guard,
    sock: zmq.Socket,
    count: int,
    deadline: float,
    stats: dict[str, Any],
) -> None:
    try:
        while time.monotonic() < deadline:
            if not sock.poll(max(1, int((deadline - time.monotonic()) * 1000))):
                continue
            peer, payload = sock.recv_multipart(copy=False)
            kind = payload.bytes[:1]
            if kind == PING:
                stats["pings"] += 1
                sock.send_multipart([peer, payload], copy=False)
                continue
            now = time.monotonic()
            stats.setdefault("first_s", now)
            stats.setdefault("first_cpu_s", time.process_time())
            stats["last_s"] = now
            stats["last_cpu_s"] = time.process_time()
            stats["messages"] += 1
            stats["bytes"] += len(payload)
            if stats["messages"] >= count:
                sock.send_multipart([peer.bytes, ACK])
                stats["done"] = True
                return
    except Exception as exc:  # reported by result(); the thread must not die silently
        stats["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        stats["refused"] = guard.refused()
        sock.close()
        guard.close()
        context.term()


def result(request_json: str) -> str:
    """Wait (bounded) for a sink to finish; its counts, and whether it got everything."""
    request = json.loads(request_json)
    thread, stats = _sinks.pop(str(request["id"]))
    thread.join(float(request.get("timeout", 10.0)))
    reply = {k: v for k, v in stats.items() if not k.startswith(("first_", "last_"))}
    if "first_s" in stats:
        reply["receive_s"] = stats["last_s"] - stats["first_s"]
        reply["receive_cpu_s"] = stats["last_cpu_s"] - stats["first_cpu_s"]
    reply["finished"] = not thread.is_alive()
    return json.dumps(reply)


def send(request_json: str) -> str:
    """Ping, then stream to a sink's address; returns latency and bandwidth as seen here."""
    request = json.loads(request_json)
    count, size = int(request["count"]), int(request["size"])
    pings, timeout = int(request.get("pings", 10)), float(request.get("timeout", 10.0))
    deadline = time.monotonic() + timeout
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        Guard(context, request.get("security")).present(sock, SINK, str(request["address"]))
        sock.connect(str(request["address"]))
        ping = PING + bytes(PING_BYTES - 1)
        rtts = []
        for i in range(pings + 1):  # the first one also waits for the connection: not counted
            start = time.perf_counter()
            sock.send(ping)
            _receive(sock, deadline, "a ping's echo")
            if i:
                rtts.append(time.perf_counter() - start)
        rtt = statistics.median(rtts) if rtts else 0.0
        block = memoryview(DATA + bytes(size - 1))
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(count):
            sock.send(block, copy=False)
        _receive(sock, deadline, "the ack of the last message")
        elapsed, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    finally:
        sock.close(0)
        context.term()
    moving = max(elapsed - rtt, elapsed * 0.05, 1e-9)  # a zero or negative time on noise
    return json.dumps(
        {
            "latency_s": rtt / 2,
            "rtt_s": rtt,
            "rtts_s": rtts,
            "elapsed_s": elapsed,
            "send_cpu_s": cpu,
            "bytes": count * size,
            "bandwidth_Bps": count * size / moving,
        }
    )


def _receive(sock: zmq.Socket, deadline: float, what: str) -> bytes:
    left = deadline - time.monotonic()
    if left <= 0 or not sock.poll(int(left * 1000)):
        raise TimeoutError(f"no reply from the probe sink: waited for {what}")
    return sock.recv()


def memory() -> str:
    """What this worker has: available and total bytes of memory, CPU cores, and the CPU time
    its cgroup grants per second (``cpu_quota``, in cores; null when unlimited) over periods of
    ``cpu_period_s``."""
    vm = psutil.virtual_memory()
    quota = cpu_quota()
    return json.dumps(
        {
            "available": int(vm.available),
            "total": int(vm.total),
            "cpus": os.cpu_count() or 1,
            "cpu_quota": quota[0] if quota else None,
            "cpu_period_s": quota[1] if quota else None,
        }
    )


def cpu_quota(
    proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")
) -> tuple[float, float] | None:
    """The tightest CPU quota on this process's cgroup path: (cores, period in seconds).

    A board with a quota computes at full speed until it has used its share of a period, then
    waits for the next one: the planner predicts a stage from both. cgroup v1's cpu controller
    (``cpu.cfs_quota_us``, ``cpu.cfs_period_us``) and v2's ``cpu.max`` are read; None when no
    level of the path sets one.
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    found: list[tuple[float, float]] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            mounts = [root]
        elif "cpu" in controllers.split(","):
            mounts = [root / controllers, root / "cpu", root / "cpu,cpuacct"]
        else:
            continue
        for mount in mounts:
            if mount.is_dir():
                found += _quotas_along(mount, path, v2=controllers == "")
                break
    return min(found, key=lambda q: q[0]) if found else None


def _quotas_along(mount: Path, path: str, v2: bool) -> list[tuple[float, float]]:
    """The quotas set on ``path`` and on every cgroup above it."""
    quotas = []
    parts = [p for p in path.split("/") if p]
    for depth in range(len(parts), -1, -1):
        folder = mount.joinpath(*parts[:depth])
        try:
            if v2:
                quota_text, period_text = (folder / "cpu.max").read_text().split()
            else:
                quota_text = (folder / "cpu.cfs_quota_us").read_text().strip()
                period_text = (folder / "cpu.cfs_period_us").read_text().strip()
        except (OSError, ValueError):
            continue
        if quota_text in ("max", "-1"):
            continue
        period_us = float(period_text)
        quotas.append((float(quota_text) / period_us, period_us / 1e6))
    return quotas


FUNCTIONS = (
    ("tvmpipe.probe.sink", sink),
    ("tvmpipe.probe.send", send),
    ("tvmpipe.probe.result", result),
    ("tvmpipe.probe.memory", memory),
)
