"""Where each stage runs: placements from ``servers=``, ``tracker=`` or a cluster file.

A cluster file (TOML; see deploy/cluster.example.toml) names the tracker, how the workers
reach this controller and the workers' secret file, and per stage a tracker key or a direct
``host:port`` plus worker options and whether relay mode is allowed. Every mistake in it is
reported with the file and the place in it.
"""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tvmpipe.proto.errors import ConfigError

from .library import PipelineLibrary


class ClusterFileError(ConfigError):
    """A cluster file that cannot be used; the message says where in the file."""


@dataclass(frozen=True)
class Placement:
    """One stage: on a local worker (neither set), a ``server``, or by tracker ``key``."""

    server: str | None = None
    key: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # cpu_affinity, num_threads
    allow_relay: bool = False  # may run on a plain TVM RPC server (relay mode)


@dataclass
class ClusterPlan:
    placements: dict[str, Placement]
    tracker: tuple[str, int] | None = None
    client_host: str | None = None
    bind_host: str | None = None
    secret_file: str | None = None  # relative to the cluster file's folder


STAGE_SETTINGS = {
    "key": str,
    "server": str,
    "cpu_affinity": str,
    "num_threads": int,
    "allow_relay": bool,
}
CONTROLLER_SETTINGS: dict[str, type] = {"client_host": str, "bind_host": str, "secret_file": str}
SECTIONS = {"tracker", "controller", "stages"}


def plan_from_arguments(
    lib: PipelineLibrary, servers: Sequence[str] | None, tracker: tuple[str, int] | None
) -> ClusterPlan:
    if servers is not None and len(servers) != len(lib.stages):
        names = ", ".join(s.name for s in lib.stages)
        raise ConfigError(
            f"servers lists {len(servers)} address(es) but the pipeline has "
            f"{len(lib.stages)} stages ({names})"
        )
    placements = {}
    for index, stage in enumerate(lib.stages):
        if servers is not None:
            placements[stage.name] = Placement(server=servers[index])
        elif tracker is not None:
            placements[stage.name] = Placement(key=stage.rpc_key)
        else:
            placements[stage.name] = Placement()
    return ClusterPlan(placements, tracker)


def load_cluster(path: str | Path, lib: PipelineLibrary) -> ClusterPlan:
    """Read a cluster file and check it against the pipeline's stages."""
    where = str(path)
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise ClusterFileError(f"{where}: no such cluster file") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ClusterFileError(f"{where}: not valid TOML: {exc}") from exc
    unknown = sorted(set(data) - SECTIONS)
    if unknown:
        raise ClusterFileError(f"{where}: unknown section(s) {unknown}; valid: {sorted(SECTIONS)}")
    tracker = _tracker(data.get("tracker"), where)
    controller = _table(data.get("controller", {}), f"{where}: [controller]")
    _only(controller, CONTROLLER_SETTINGS, f"{where}: [controller]")
    stages = _table(data.get("stages", {}), f"{where}: [stages]")
    names = [s.name for s in lib.stages]
    for name in stages:
        if name not in names:
            raise ClusterFileError(
                f"{where}: [stages.{name}]: the pipeline has no stage {name!r} "
                f"(its stages: {', '.join(names)})"
            )
    placements = {}
    for stage in lib.stages:
        place = f"{where}: [stages.{stage.name}]"
        settings = _table(stages.get(stage.name, {}), place)
        _only(settings, STAGE_SETTINGS, place)
        if "key" in settings and "server" in settings:
            raise ClusterFileError(f"{place}: give key or server, not both")
        server = settings.get("server")
        if server is not None and not _is_host_port(server):
            raise ClusterFileError(f"{place}: server = {server!r} is not HOST:PORT")
        key = settings.get("key") or (None if server else stage.rpc_key or None)
        if server is None and key is None:
            raise ClusterFileError(
                f"{place}: no key or server for this stage, and it has no rpc_key in the "
                f'package; add key = "..." or server = "host:port"'
            )
        if key is not None and tracker is None:
            raise ClusterFileError(
                f"{place}: key {key!r} needs a [tracker] section with host and port"
            )
        options = {k: v for k, v in settings.items() if k in ("cpu_affinity", "num_threads")}
        relay = settings.get("allow_relay", False)
        placements[stage.name] = Placement(server, key, options, relay)
    secret_file = controller.get("secret_file")
    if secret_file is not None:
        secret_file = str(Path(path).parent / Path(secret_file).expanduser())
    return ClusterPlan(
        placements,
        tracker,
        controller.get("client_host"),
        controller.get("bind_host"),
        secret_file,
    )


def _tracker(section: Any, where: str) -> tuple[str, int] | None:
    if section is None:
        return None
    table = _table(section, f"{where}: [tracker]")
    _only(table, {"host": str, "port": int}, f"{where}: [tracker]")
    if "host" not in table or "port" not in table:
        raise ClusterFileError(f"{where}: [tracker] needs both host and port")
    if not 0 < table["port"] < 65536:
        raise ClusterFileError(f"{where}: [tracker] port {table['port']} is not a TCP port")
    return table["host"], table["port"]


def _table(value: Any, place: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ClusterFileError(f"{place} must be a table, not {type(value).__name__}")
    return value


def _only(table: dict[str, Any], allowed: dict[str, type], place: str) -> None:
    for name, value in table.items():
        if name not in allowed:
            raise ClusterFileError(
                f"{place}: unknown setting {name!r}; valid: {', '.join(sorted(allowed))}"
            )
        if not isinstance(value, allowed[name]) or isinstance(value, bool) != (
            allowed[name] is bool
        ):
            raise ClusterFileError(
                f"{place}: {name} must be a {allowed[name].__name__}, not {value!r}"
            )


def _is_host_port(text: str) -> bool:
    host, _, port = text.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536
