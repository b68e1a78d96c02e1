"""Placing the stages: a session per stage where the plan puts it, started, wired, replaced.

The fleet owns the RPC sessions and the loopback workers it started. Stages start in reverse
order of the data flow (``Wiring.start_order``): a stage binds one receive socket per sender
when it starts, so its senders learn where to send only afterwards. ``replace`` deploys one
lost stage again and rewires the stages that send to it (see recovery.py for the protocol).
A stage on TVM's own RPC server (no tvmpipe there) runs in relay mode, from a local stage
process, only where the user allowed it (``allow_relay``): such a server takes code from anyone
and cannot check the secret, so one registered at the tracker under a stage's key could be
anybody's. Relay mode is logged and shown in ``stats()``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import psutil

from tvmpipe.proto.errors import DeployError
from tvmpipe.proto.messages import Message, encode_blob
from tvmpipe.proto.rpcauth import secret_file_from_env

from .cluster import ClusterPlan, Placement
from .deploy import (
    REQUEST_TIMEOUT_S,
    LocalWorker,
    PlainServerError,
    StageSession,
    connect_server,
    controller_secret,
    request_from_tracker,
    start_local_workers,
)
from .library import PipelineLibrary, StageInfo
from .progress import stage_progress
from .wiring import CLIENT, Wiring

log = logging.getLogger("tvmpipe")
REWIRE_WAIT_S = 12.0  # a stage's own rewire gives up after 10 s (worker/stage.py)
STATS_WAIT_S = 2.0  # a frozen stage's call holds its session: do not wait for it long


class Fleet:
    def __init__(
        self,
        lib: PipelineLibrary,
        plan: ClusterPlan,
        wiring: Wiring,
        bind_host: str,
        client_host: str,
        deploy_timeout: float = REQUEST_TIMEOUT_S,
        secret_file: str | os.PathLike[str] | None = None,
        allow_relay: bool = False,
    ):
        """``secret_file`` (default ``$TVMPIPE_SECRET_FILE``): the workers' secret, which the
        loopback workers started here get too; ``allow_relay``: every stage may run in relay
        mode (a cluster file may allow it per stage)."""
        self.lib = lib
        self.plan = plan
        self.wiring = wiring
        self.deploy_timeout = deploy_timeout
        self.secret_file = str(secret_file) if secret_file else secret_file_from_env()
        self.secret: bytes | None = None  # read in deploy()
        self.allow_relay = allow_relay
        self._bind_host = bind_host
        self._client_host = client_host
        self._lock = threading.Lock()
        self.sessions: dict[str, StageSession] = {}
        self.addresses: dict[str, dict[str, str]] = {}  # stage -> sender -> its socket
        self.relay_boards: dict[str, str] = {}  # stage -> the plain server it is relayed to
        self.lost: list[StageSession] = []  # not asked to stop: a call could hang
        self.local_workers: list[LocalWorker] = []
        self.worker_of: dict[str, LocalWorker] = {}  # "stage" or "stage relay" -> its worker
        self._params_set: dict[str, dict[str, np.ndarray]] = {}  # replayed on a new session
        self.trace = False  # stages keep each input's timeline

    # ----- deploying
    def deploy(
        self, client_address: str, queue_bytes: int, epoch: int, progress: bool | None = None
    ) -> None:
        """Place, load and start every stage; on failure the caller closes the fleet."""
        self.secret = controller_secret(self.secret_file)
        local = [s.name for s in self.lib.stages if self.plan.placements[s.name] == Placement()]
        if local:  # started together: each takes a second or so to import TVM
            workers = start_local_workers(len(local), self._bind_host, self.secret_file)
            self.local_workers = workers
            self.worker_of = dict(zip(local, workers, strict=True))
        with stage_progress("deploying", len(self.lib.stages), progress) as bar:
            for stage in self.lib.stages:
                self.sessions[stage.name] = self.place(stage)
                size = self.lib.artifact_path(stage).stat().st_size
                where = self.sessions[stage.name].peer
                bar.set_postfix_str(f"{stage.name}: {size >> 10} KiB to {where}, loaded")
                bar.update(1)
        for name in self.wiring.start_order():
            self.start(name, client_address, queue_bytes, epoch)

    def place(self, stage: StageInfo, fresh_worker: bool = False) -> StageSession:
        """A session for ``stage`` where the plan puts it, with the stage loaded and weighted."""
        place = self.plan.placements[stage.name]
        stage = replace(stage, **place.options)
        relay: dict[str, Any] | None = None
        timeout, secret = self.deploy_timeout, self.secret
        if place.server is not None:
            host, _, port = place.server.rpartition(":")
            session = connect_server(stage, place.server, timeout, secret)
            relay = {"host": host, "port": port, "board": place.server}
        elif place.key is not None:
            assert self.plan.tracker is not None
            session = request_from_tracker(stage, self.plan.tracker, place.key, timeout, secret)
            tracker_host, tracker_port = self.plan.tracker
            board = f"a worker with key {place.key!r} at tracker {tracker_host}:{tracker_port}"
            relay = {"tracker": [tracker_host, tracker_port], "key": place.key, "board": board}
        else:
            worker = self._local_worker(stage.name, fresh=fresh_worker)
            session = connect_server(stage, f"{worker.host}:{worker.port}", timeout, secret)
        try:
            try:
                session.handshake()
            except PlainServerError as exc:
                if relay is None:
                    raise
                if not (self.allow_relay or place.allow_relay):
                    raise DeployError(
                        f"{exc} (no tvmpipe there, so nothing checks who sends it code): "
                        f"refusing to run the stage there in relay mode; if that server is "
                        f"yours, pass allow_relay=True to PipelineModule, or set "
                        f"allow_relay = true in [stages.{stage.name}] of the cluster file"
                    ) from exc
                session.close()  # frees the plain server for the relay's own session
                session = self._relay_session(stage, relay)
            else:
                relay = None
            session.upload_and_load(self.lib, relay)
            params = {**self.lib.initial_params(stage), **self._params_set.get(stage.name, {})}
            if params:
                session.call("tvmpipe.stage.set_params", blob(params))
        except BaseException:
            session.close()
            raise
        return session

    def start(self, name: str, client_address: str, queue_bytes: int, epoch: int) -> None:
        """Start one stage (every stage it sends to has started): it binds its sockets."""
        message = self.wiring.start_message(
            name, self.addresses, client_address, queue_bytes, epoch, self.trace
        )
        reply = json.loads(self.sessions[name].call("tvmpipe.stage.start", message))
        self.addresses[name] = dict(reply["addresses"])
        session = self.sessions[name]
        session.address = next(iter(self.addresses[name].values()))

    def replace(
        self,
        lost: StageSession,
        client_address: str,
        queue_bytes: int,
        epoch: int,
        rewire_client: Callable[[str], None],
    ) -> StageSession:
        """Deploy a lost stage again and point every sender at it; returns the new session.

        Each upstream stage's rewire returns once it sends to the new address; the client's
        own socket is replaced through ``rewire_client(address)``.
        """
        name = lost.stage.name
        lost.abort()
        lost.close(stop=False)
        with self._lock:
            self.lost.append(lost)
        local = self.plan.placements[name] == Placement()
        fresh = local and self._worker_is_held(name, lost)
        try:
            session = self.place(self.lib.stage(name), fresh_worker=fresh)
        except DeployError:
            if not local or fresh:
                raise
            session = self.place(self.lib.stage(name), fresh_worker=True)  # its worker hangs
        self.sessions[name] = session
        self.start(name, client_address, queue_bytes, epoch)
        for upstream in self.wiring.upstream_stages(name):
            request = json.dumps({"name": name, "address": self.addresses[name][upstream]})
            self._rewire(upstream, request)
        if CLIENT in self.addresses[name]:
            rewire_client(self.addresses[name][CLIENT])
        return session

    def _rewire(self, upstream: str, request: str) -> None:
        """Point ``upstream`` at a replaced stage, within ``REWIRE_WAIT_S``.

        An upstream stage lost meanwhile (killed, or frozen: then the call would wait as long
        as the freeze) has its session cut, so that the monitor reports it and it is deployed
        again, wired to the new address when it starts.
        """
        session = self.sessions[upstream]
        failed: list[str] = []  # not the error: its traceback would hold the session open

        def call() -> None:
            try:
                session.call("tvmpipe.stage.rewire", request)
            except DeployError as exc:
                failed.append(str(exc))

        thread = threading.Thread(target=call, name=f"tvmpipe-rewire-{upstream}", daemon=True)
        thread.start()
        thread.join(REWIRE_WAIT_S)
        if thread.is_alive() or failed:
            why = failed[0] if failed else f"no answer within {REWIRE_WAIT_S:g} s"
            log.warning("stage %r could not be rewired (%s); replacing it too", upstream, why)
            session.abort()
            thread.join(REWIRE_WAIT_S)

    def stage_sessions(self) -> list[StageSession]:
        """The sessions in stage order."""
        return [self.sessions[s.name] for s in self.lib.stages]

    # ----- weights
    def set_params(self, stage: str, arrays: Mapping[str, np.ndarray]) -> None:
        self.sessions[stage].call("tvmpipe.stage.set_params", blob(arrays))
        self._params_set.setdefault(stage, {}).update(arrays)

    # ----- looking
    def stats(self) -> dict[str, Any]:
        stages = {}
        for name, session in list(self.sessions.items()):
            try:
                if session in self.lost:
                    raise DeployError(f"stage {name!r} on {session.peer} is lost")
                data = json.loads(session.call("tvmpipe.stage.stats", wait=STATS_WAIT_S))
            except DeployError as exc:  # lost, and being deployed again or failed
                data = {"unreachable": str(exc)}
            data.update(
                device=session.stage.device,
                worker=session.peer,
                address=session.address,
                addresses=self.addresses.get(name, {}),
                pid=session.remote_pid,
            )
            if name in self.relay_boards:
                data.update(mode="relay", board=self.relay_boards[name])
            stages[name] = data
        return stages

    def locate(self, seq: int) -> tuple[str, str]:
        """Where input ``seq`` stopped: the first stage, in data-flow order, that has not sent it
        on, and what it says about it."""
        for stage in self.lib.stages:
            name = stage.name
            try:
                session = self.sessions[name]
                where = json.loads(session.call("tvmpipe.stage.locate", seq, wait=STATS_WAIT_S))
            except DeployError as exc:
                return name, f"stage {name!r} did not answer ({exc})"
            if where["state"] == "waiting":
                return name, f"stage {name!r} waits for its part from {', '.join(where['for'])}"
            if where["state"] == "computing":
                return name, f"stage {name!r} is still computing it"
            if where["state"] == "unseen":
                return name, f"stage {name!r} never received it"
        last = self.lib.stages[-1].name
        return last, "every stage sent it on; its result was lost on the way to this client"

    def traces(self) -> dict[str, list[dict[str, float]]]:
        """Each stage's recent input timelines (tracing), in its own clock."""
        found = {}
        for name, session in self.sessions.items():
            try:
                found[name] = json.loads(session.call("tvmpipe.stage.traces", wait=STATS_WAIT_S))
            except DeployError:
                found[name] = []  # lost: its timeline went with it
        return found

    def clock_offsets(self, samples: int = 5) -> dict[str, float]:
        """Seconds each stage's clock is ahead of this one's: the remote time minus the middle of
        the call, from the call with the shortest round trip."""
        offsets = {}
        for name, session in self.sessions.items():
            best: tuple[float, float] | None = None
            for _ in range(samples):
                before = time.time()
                remote = float(session.call("tvmpipe.clock"))
                after = time.time()
                if best is None or after - before < best[0]:
                    best = (after - before, remote - (before + after) / 2)
            assert best is not None
            offsets[name] = best[1]
        return offsets

    # ----- lifetime
    def close(self) -> None:
        """Stop every stage, end every session, stop the loopback workers started here."""
        for session in self.sessions.values():
            session.close(stop=session not in self.lost)
        self.sessions = {}
        for worker in self.local_workers:
            worker.stop()
        self.local_workers = []

    # ----- internals
    def _local_worker(self, key: str, extra_args: Sequence[str] = (), fresh: bool = False):
        """The loopback worker for ``key``; a new one if there is none, it died, or ``fresh``."""
        worker = self.worker_of.get(key)
        if worker is not None and worker.process.poll() is None and not fresh:
            return worker
        if worker is not None:
            worker.process.kill()  # dead, or not answering: it may be frozen
            worker.stop()
            self.local_workers.remove(worker)
        worker = LocalWorker(self._bind_host, extra_args, self.secret_file)
        self.local_workers.append(worker)
        worker.wait_ready(self.deploy_timeout)
        self.worker_of[key] = worker
        return worker

    def _worker_is_held(self, name: str, lost: StageSession) -> bool:
        """Whether the stage's loopback worker cannot take a new session now: it is frozen, or
        still serving the lost session (a frozen one: TVM's server serves one at a time)."""
        worker = self.worker_of.get(name)
        if worker is None or worker.process.poll() is not None:
            return False
        held = [worker.process.pid] + ([lost.remote_pid] if lost.remote_pid else [])
        for pid in held:
            try:
                status = psutil.Process(pid).status()
            except psutil.NoSuchProcess:
                continue
            if pid == worker.process.pid and status == psutil.STATUS_STOPPED:
                return True
            if pid != worker.process.pid and status != psutil.STATUS_ZOMBIE:
                return True
        return False

    def _relay_session(self, stage: StageInfo, relay: dict[str, Any]) -> StageSession:
        """A local stage process that drives a plain TVM RPC server for this stage."""
        board = relay.pop("board")
        log.warning(
            "stage %r: %s is a plain TVM RPC server without tvmpipe; running the stage in relay "
            "mode through a local stage process (every tensor crosses TVM's RPC twice)",
            stage.name,
            board,
        )
        self.relay_boards[stage.name] = board
        worker = self._local_worker(f"{stage.name} relay", ["--custom-addr", self._client_host])
        address = f"{worker.host}:{worker.port}"
        session = connect_server(stage, address, self.deploy_timeout, self.secret)
        session.handshake()
        return session


def blob(arrays: Mapping[str, np.ndarray]) -> bytearray:
    tensors = {name: np.ascontiguousarray(value) for name, value in arrays.items()}
    return bytearray(encode_blob(Message.data(0, CLIENT, tensors)))
