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

from .library import PipelineLibrary

CLIENT = "client"


class Wiring:
    def __init__(self, lib: PipelineLibrary):
        self.lib = lib

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
        self, stage: str, addresses: Mapping[str, str], client: str
    ) -> list[dict[str, Any]]:
        by_dst: dict[str, list[tuple[int, str]]] = {}
        for edge in self.lib.connections:
            if edge.src == stage:
                by_dst.setdefault(edge.dst, []).append((edge.index, edge.param))
        dests = [
            {"name": dst, "address": addresses[dst], "tensors": tensors}
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

    def start_message(
        self, stage: str, addresses: Mapping[str, str], client: str, queue_bytes: int
    ) -> str:
        return json.dumps(
            {
                "senders": self.senders(stage),
                "destinations": self.destinations(stage, addresses, client),
                "queue_bytes": queue_bytes,
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
