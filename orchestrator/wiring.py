"""Who sends what to whom: the data-plane graph derived from a library's connections.

Every sender delivers one message per sequence number to each of its destinations: the client
sends a stage all of its pipeline inputs in one message, a stage sends each next stage the
outputs that it consumes, and the output stages send the client the pipeline outputs they hold
(named by their position in ``cfg.outputs``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from tvmpipe.proto.errors import StageError
from tvmpipe.proto.messages import Message, MsgType
from tvmpipe.proto.security import Keyring

from .library import PipelineLibrary
from .signature import TensorSpec

CLIENT = "client"


class Wiring:
    def __init__(self, lib: PipelineLibrary, security: str = "off"):
        self.lib = lib
        self.keyring = Keyring.generate(security, self.edges())

    def edges(self) -> list[tuple[str, str]]:
        """Every (sender, receiver) pair of the data plane, the client included."""
        pairs = [(sender, s.name) for s in self.lib.stages for sender in self.senders(s.name)]
        return pairs + [(stage, CLIENT) for stage in sorted(self.output_stages())]

    def receivers(self, party: str) -> list[str]:
        """Whom ``party`` (a stage or the client) sends to."""
        return sorted({r for s, r in self.edges() if s == party})

    def share(self, party: str) -> dict[str, Any]:
        """``party``'s credentials: see proto/security.py."""
        senders = self.senders(party) if party != CLIENT else sorted(self.output_stages())
        return self.keyring.share(party, senders, self.receivers(party))

    def input_stages(self) -> list[str]:
        names = {b.stage for b in self.lib.inputs}
        return [s.name for s in self.lib.stages if s.name in names]

    def output_stages(self) -> frozenset[str]:
        return frozenset(o.stage for o in self.lib.outputs)

    def senders(self, stage: str) -> list[str]:
        found = {e.src for e in self.lib.connections if e.dst == stage}
        if any(b.stage == stage for b in self.lib.inputs):
            found.add(CLIENT)
        return sorted(found)

    def destinations(
        self, stage: str, addresses: Mapping[str, Mapping[str, str]], client: str
    ) -> list[dict[str, Any]]:
        by_dst: dict[str, list[tuple[int, str]]] = {}
        for edge in self.lib.connections:
            if edge.src == stage:
                by_dst.setdefault(edge.dst, []).append((edge.index, edge.param))
        dests = [
            {"name": dst, "address": addresses[dst][stage], "tensors": tensors}
            for dst, tensors in by_dst.items()
        ]
        outputs = [
            (o.index, str(pos)) for pos, o in enumerate(self.lib.outputs) if o.stage == stage
        ]
        if outputs:
            dests.append({"name": CLIENT, "address": client, "tensors": outputs})
        return dests

    def upstream_stages(self, stage: str) -> list[str]:
        """The stages that send to ``stage`` (the client aside)."""
        return [s for s in self.senders(stage) if s != CLIENT]

    def start_order(self) -> list[str]:
        """Stages in the order to start them: each after every stage it sends to.

        A stage binds its receive sockets when it starts, so its senders learn their addresses
        only afterwards."""
        return [s.name for s in reversed(self.lib.stages)]

    def max_frames(self, stage: str) -> dict[str, int]:
        """For each sender of ``stage``, the largest tensor it may send (0: not known)."""
        info = self.lib.stage(stage)
        limits: dict[str, int] = {}
        for sender in self.senders(stage):
            if sender == CLIENT:
                params = [b.param for b in self.lib.inputs if b.stage == stage]
            else:
                params = [
                    e.param for e in self.lib.connections if e.src == sender and e.dst == stage
                ]
            sizes = [_nbytes(next(s for s in info.inputs if s.name == p)) for p in params]
            limits[sender] = 0 if 0 in sizes else max(sizes, default=0)
        return limits

    def output_frame_limit(self) -> int:
        """The largest pipeline output tensor (0: not known), for the client's socket."""
        sizes = []
        for out in self.lib.outputs:
            specs = self.lib.stage(out.stage).outputs
            sizes.append(0 if specs is None else _nbytes(specs[out.index]))
        return 0 if 0 in sizes else max(sizes, default=0)

    def start_message(
        self,
        stage: str,
        addresses: Mapping[str, Mapping[str, str]],
        client: str,
        queue_bytes: int,
        epoch: int,
        trace: bool = False,
    ) -> str:
        """What ``tvmpipe.stage.start`` takes; ``addresses[dst][stage]`` is where to send."""
        return json.dumps(
            {
                "senders": self.max_frames(stage),
                "destinations": self.destinations(stage, addresses, client),
                "queue_bytes": queue_bytes,
                "epoch": epoch,
                "trace": trace,
                "security": self.share(stage),
            }
        )

    def client_messages(
        self, inputs: Mapping[str, np.ndarray]
    ) -> list[tuple[str, dict[str, np.ndarray]]]:
        per_stage: dict[str, dict[str, np.ndarray]] = {}
        for binding in self.lib.inputs:
            per_stage.setdefault(binding.stage, {})[binding.param] = inputs[binding.name]
        return list(per_stage.items())

    def assemble_outputs(
        self, seq: int, parts: Mapping[str, Message]
    ) -> list[np.ndarray] | StageError:
        """The pipeline outputs for seq in ``cfg.outputs`` order, or the first stage error."""
        for part in parts.values():
            if part.type is MsgType.ERROR and part.error is not None:
                return part.error.to_stage_error(seq)
        tensors: dict[str, np.ndarray] = {}
        for part in parts.values():
            tensors.update(part.tensors)
        return [tensors[str(pos)] for pos in range(len(self.lib.outputs))]


def _nbytes(spec: TensorSpec) -> int:
    """A tensor's size from its spec; 0 when its dtype or a dimension is not known."""
    if spec.dtype is None or spec.shape is None or any(d is None for d in spec.shape):
        return 0
    try:
        itemsize = np.dtype(spec.dtype).itemsize
    except TypeError:  # a dtype numpy does not know (bfloat16, ...)
        return 0
    count = 1
    for dim in spec.shape:
        count *= int(dim or 0)
    return max(1, count * itemsize)
