"""Recorded pipeline timestamps as a Chrome trace (for Perfetto) and a PNG Gantt chart.

Pure: it reads the per-input records the stages and the controller keep and writes files; no
sockets, no TVM. Each stage records in its own clock; ``offsets`` (estimated at deploy) bring
every stage onto the controller's clock so that one input's path lines up across processes.

Stage record: ``{"seq", "epoch", "first_part", "complete", "start", "end", "sent"}`` (seconds):
waiting for parts = [first_part, complete], queued = [complete, start], computing = [start,
end], encoding and sending = [end, sent]. Client record: ``{"seq", "send_start", "send_end",
"result"}``: send = [send_start, send_end], end-to-end = [send_start, result], and the result's
arrival as an instant. A missing key skips the phases that need it.
"""

from __future__ import annotations

import heapq
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

Record = Mapping[str, float]

# (event name, start key, end key, thread kind). Waiting and queued share the "receive" track.
STAGE_PHASES = (
    ("wait", "first_part", "complete", "receive"),
    ("queued", "complete", "start", "receive"),
    ("compute", "start", "end", "compute"),
    ("send", "end", "sent", "send"),
)
STAGE_THREADS = ("receive", "compute", "send")
CLIENT_PHASES = (
    ("send", "send_start", "send_end", "send"),
    ("end-to-end", "send_start", "result", "end-to-end"),
)
CLIENT_THREADS = ("send", "end-to-end", "result")
CLIENT = "client"

# (start, end, seq, epoch, phase name, thread kind), all in controller seconds.
_Span = tuple[float, float, int, int | None, str, str]


def write_trace(
    path: str | Path,
    stages: Mapping[str, Sequence[Record]],
    client: Sequence[Record],
    offsets: Mapping[str, float] | None = None,
    png: bool = True,
) -> tuple[Path, Path | None]:
    """Write the Chrome trace JSON at ``path`` and (if matplotlib is importable and png) a PNG
    beside it (same stem, .png); return both paths (None for a PNG not written).

    Raises ValueError for no records at all, a record whose times go backwards, a non-finite
    time or offset, or a path whose directory does not exist: a trace that silently lies about
    timing is worse than none.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(
            f"cannot write the trace to {path}: directory {path.parent} does not exist"
        )
    spans = _collect(stages, client, offsets)
    origin = min(s[0] for rows in spans.values() for s in rows)
    path.write_text(
        json.dumps(_trace_events(spans, origin), allow_nan=False, separators=(",", ":"))
    )
    png_path = path.with_suffix(".png")
    if not png or not _write_png(png_path, spans, origin, len(client)):
        return path, None
    return path, png_path


def busiest_stage(
    stages: Mapping[str, Sequence[Record]], offsets: Mapping[str, float] | None = None
) -> str:
    """The stage computing for the largest share of the trace's span: the pipeline's bottleneck,
    since every other stage ends up waiting for it."""
    shares = compute_shares(_collect(stages, [], offsets))
    if not shares:
        raise ValueError("no stage has a compute record, so no stage can be the busiest")
    return max(shares, key=lambda name: shares[name])


def compute_shares(spans: Mapping[str, Sequence[_Span]]) -> dict[str, float]:
    """Per stage with compute records: the fraction of the whole span it spent computing
    (overlapping computes counted once)."""
    everything = [s for rows in spans.values() for s in rows]
    if not everything:
        return {}
    span = max(s[1] for s in everything) - min(s[0] for s in everything)
    shares = {}
    for name, rows in spans.items():
        if name == CLIENT:
            continue
        busy = _union_length([(s[0], s[1]) for s in rows if s[4] == "compute"])
        if any(s[4] == "compute" for s in rows):
            shares[name] = busy / span if span > 0 else 1.0
    return shares


def _collect(
    stages: Mapping[str, Sequence[Record]],
    client: Sequence[Record],
    offsets: Mapping[str, float] | None,
) -> dict[str, list[_Span]]:
    """Validate the records and turn them into phase spans on the controller's clock; the
    client comes first, then the stages in the order given."""
    offsets = offsets or {}
    for name, offset in offsets.items():
        if not math.isfinite(offset):
            raise ValueError(f"offset for stage {name!r} is not finite: {offset!r}")
    if not client and not any(stages.values()):
        raise ValueError("no records at all: nothing to trace")
    if CLIENT in stages:
        raise ValueError(f"a stage may not be called {CLIENT!r}: that process is the controller")
    spans = {CLIENT: _spans(CLIENT, client, CLIENT_PHASES, 0.0)}
    for name, records in stages.items():
        spans[name] = _spans(name, records, STAGE_PHASES, offsets.get(name, 0.0))
    if not any(spans.values()):
        raise ValueError("no record has a complete phase (both of its times): nothing to trace")
    return spans


def _spans(
    who: str,
    records: Sequence[Record],
    phases: Sequence[tuple[str, str, str, str]],
    offset: float,
) -> list[_Span]:
    out: list[_Span] = []
    for i, rec in enumerate(records):
        if "seq" not in rec:
            raise ValueError(f"{who} record {i} has no 'seq': {dict(rec)}")
        for key, value in rec.items():
            if not math.isfinite(value):
                raise ValueError(f"{who} record {i} (seq {rec['seq']}) has a non-finite {key}")
        seq = int(rec["seq"])
        epoch = int(rec["epoch"]) if "epoch" in rec else None
        for phase, a, b, kind in phases:
            if a not in rec or b not in rec:
                continue
            if rec[b] < rec[a]:
                raise ValueError(
                    f"{who} record for seq {seq}: time goes backwards in {phase!r}: "
                    f"{b}={rec[b]!r} < {a}={rec[a]!r}"
                )
            out.append((rec[a] - offset, rec[b] - offset, seq, epoch, phase, kind))
        if who == CLIENT and "result" in rec:
            t = rec["result"] - offset
            out.append((t, t, seq, epoch, "result", "result"))
    return out


def _lanes(intervals: Sequence[tuple[float, float]]) -> list[int]:
    """Assign each interval the lowest lane free at its start, so no two events in a lane
    overlap partially (Perfetto drops complete events that do not nest on one thread)."""
    lane_of = [0] * len(intervals)
    busy: list[tuple[float, int]] = []  # (end, lane) of lanes in use
    free: list[int] = []
    for i in sorted(range(len(intervals)), key=lambda i: intervals[i]):
        start, end = intervals[i]
        while busy and busy[0][0] <= start:
            heapq.heappush(free, heapq.heappop(busy)[1])
        lane = heapq.heappop(free) if free else len(busy) + len(free)
        heapq.heappush(busy, (end, lane))
        lane_of[i] = lane
    return lane_of


def _trace_events(spans: Mapping[str, Sequence[_Span]], origin: float) -> dict[str, Any]:
    """The Trace Event Format document: one pid per process, one tid per phase kind (more lanes
    only where inputs overlap), times in microseconds from ``origin``."""

    def us(t: float) -> float:
        return round((t - origin) * 1e6, 3)

    meta: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    for pid, (name, rows) in enumerate(spans.items(), start=1):
        meta.append(_meta(pid, 0, "process_name", {"name": name}))
        meta.append(_meta(pid, 0, "process_sort_index", {"sort_index": pid}))
        tid = 0
        for kind in CLIENT_THREADS if name == CLIENT else STAGE_THREADS:
            mine = [s for s in rows if s[5] == kind]
            lanes = _lanes([(s[0], s[1]) for s in mine]) if kind != "result" else [0] * len(mine)
            per_lane: list[list[_Span]] = [[] for _ in range(max(lanes, default=-1) + 1)]
            for s, lane in zip(mine, lanes, strict=True):
                per_lane[lane].append(s)
            for lane, track in enumerate(per_lane):
                tid += 1
                label = kind if lane == 0 else f"{kind} {lane + 1}"
                meta.append(_meta(pid, tid, "thread_name", {"name": label}))
                meta.append(_meta(pid, tid, "thread_sort_index", {"sort_index": tid}))
                for s in sorted(track):
                    start, end, seq, epoch, phase, _ = s
                    args: dict[str, int] = {"seq": seq}
                    if epoch is not None:
                        args["epoch"] = epoch
                    event: dict[str, Any] = {"name": f"{phase} #{seq}", "pid": pid, "tid": tid}
                    event["ts"] = us(start)
                    if kind == "result":
                        event.update(ph="i", s="t")
                    else:
                        event.update(ph="X", dur=round((end - start) * 1e6, 3))
                    event["args"] = args
                    events.append(event)
    return {"traceEvents": meta + events, "displayTimeUnit": "ms"}


def _meta(pid: int, tid: int, name: str, args: dict[str, Any]) -> dict[str, Any]:
    return {"ph": "M", "pid": pid, "tid": tid, "name": name, "args": args}


def _union_length(intervals: Sequence[tuple[float, float]]) -> float:
    total, reach = 0.0, -math.inf
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def _write_png(
    path: Path, spans: Mapping[str, Sequence[_Span]], origin: float, n_client: int
) -> bool:
    """Draw the Gantt chart; False where matplotlib is not installed (it is an optional extra).

    A Figure without pyplot: no global backend state, no display needed.
    """
    try:
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch
    except ImportError:
        return False
    shares = compute_shares(spans)
    bottleneck = max(shares, key=lambda n: shares[n]) if shares else None
    everything = [s for rows in spans.values() for s in rows]
    span_ms = (max(s[1] for s in everything) - origin) * 1e3
    n_inputs = n_client or max(
        (len({(s[2], s[3]) for s in rows}) for rows in spans.values()), default=0
    )
    names = [n for n in spans if n != CLIENT or spans[CLIENT]]

    # phase: (colour, alpha, y offset in the row, height). Compute fills the row; waiting and
    # sending are light thin bands at its edges, so the busy stage stands out. No hatching: Agg
    # takes about a millisecond per hatched bar.
    styles = {
        "compute": ("tab:blue", 0.9, 0.1, 0.8),
        "wait": ("tab:orange", 0.45, 0.0, 0.18),
        "send": ("tab:green", 0.5, 0.82, 0.18),
    }
    client_style = ("tab:purple", 0.7, 0.3, 0.4)

    fig = Figure(figsize=(10, 1 + 0.6 * len(names)), dpi=100)
    ax = fig.add_subplot()
    labels = []
    for row, name in enumerate(names):
        y = len(names) - 1 - row
        rows = spans[name]
        if name == CLIENT:
            _bars(ax, rows, "send", origin, y, client_style)
            results = [(s[0] - origin) * 1e3 for s in rows if s[4] == "result"]
            ax.plot(
                results,
                [y + 0.5] * len(results),
                "|",
                color="black",
                markersize=8,
                markeredgewidth=0.6,
            )
            labels.append(CLIENT)
            continue
        for phase, style in styles.items():
            _bars(ax, rows, phase, origin, y, style)
        label = f"{name}\n{shares.get(name, 0.0):.0%} busy"
        labels.append(label + (" (bottleneck)" if name == bottleneck else ""))
    ax.set_yticks([len(names) - 1 - r + 0.5 for r in range(len(names))], labels, fontsize=8)
    ax.set_ylim(0, len(names))
    ax.set_xlim(0, max(span_ms, 1e-3))
    ax.set_xlabel("time since the first event (ms)")
    ax.grid(axis="x", alpha=0.3)
    title = f"{n_inputs} inputs over {span_ms:.1f} ms"
    if bottleneck is not None:
        title += f"; bottleneck: {bottleneck} ({shares[bottleneck]:.0%} computing)"
    ax.set_title(title, fontsize=10, loc="left")
    legend = [
        Patch(color="tab:blue", alpha=0.9, label="compute"),
        Patch(color="tab:orange", alpha=0.45, label="waiting for parts"),
        Patch(color="tab:green", alpha=0.5, label="encode + send"),
        Patch(color="tab:purple", alpha=0.7, label="client send"),
        Line2D([], [], color="black", marker="|", linestyle="none", label="result"),
    ]
    ax.legend(
        handles=legend,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.2),
        ncol=5,
        fontsize=7,
        frameon=False,
    )
    fig.tight_layout()
    fig.savefig(path)
    return True


def _bars(
    ax: Any,
    rows: Sequence[_Span],
    phase: str,
    origin: float,
    y: float,
    style: tuple[str, float, float, float],
) -> None:
    """One broken_barh call per phase and row: thousands of bars stay fast."""
    colour, alpha, dy, height = style
    bars = [((s[0] - origin) * 1e3, (s[1] - s[0]) * 1e3) for s in rows if s[4] == phase]
    if bars:
        ax.broken_barh(
            bars,
            (y + dy, height),
            facecolors=colour,
            alpha=alpha,
            linewidth=0,  # edges would wash out thousands of narrow bars
        )
