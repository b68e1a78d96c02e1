"""write_trace: the Chrome trace JSON (events per input, named tracks, offsets applied, no
partial overlap on a track), the PNG Gantt chart, the bottleneck and the refusals."""

from __future__ import annotations

import itertools
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest

from tvmpipe.orchestrator.trace import busiest_stage, write_trace

N = 20
T0 = 1_700_000_000.0
STAGES = ("s1", "s2", "s3")
COMPUTE = {"s1": 0.001, "s2": 0.005, "s3": 0.001}  # s2 is the slow one
WAIT, SEND, LINK = 0.0002, 0.0003, 0.0001


def simulate() -> tuple[dict[str, list[dict[str, float]]], list[dict[str, float]]]:
    """A 3-stage pipeline fed every 2 ms: each stage computes one input at a time, so inputs
    queue in front of s2 and s2's waits/queues overlap between consecutive inputs."""
    client = []
    arrive = []
    for seq in range(N):
        s = T0 + seq * 0.002
        client.append({"seq": seq, "send_start": s, "send_end": s + 0.0001})
        arrive.append(s + 0.0001 + LINK)
    stages: dict[str, list[dict[str, float]]] = {}
    for name in STAGES:
        free, recs, nxt = 0.0, [], []
        for seq, first in enumerate(arrive):
            complete = first + WAIT
            start = max(complete, free)
            end = start + COMPUTE[name]
            sent = end + SEND
            free = end
            recs.append(
                {
                    "seq": seq,
                    "epoch": 0,
                    "first_part": first,
                    "complete": complete,
                    "start": start,
                    "end": end,
                    "sent": sent,
                }
            )
            nxt.append(sent + LINK)
        stages[name] = recs
        arrive = nxt
    for rec, t in zip(client, arrive, strict=True):
        rec["result"] = t
    return stages, client


def shift(rec: dict[str, float], seconds: float) -> dict[str, float]:
    """A record as a stage whose clock runs ``seconds`` ahead would have written it."""
    return {k: v if k in ("seq", "epoch") else v + seconds for k, v in rec.items()}


def load(path: Path) -> tuple[list[dict[str, Any]], dict[int, str], dict[tuple[int, int], str]]:
    """The events, pid -> process name and (pid, tid) -> thread name of a written trace."""
    with path.open() as f:
        doc = json.load(f)
    assert doc["displayTimeUnit"] == "ms"
    meta = [e for e in doc["traceEvents"] if e["ph"] == "M"]
    procs = {e["pid"]: e["args"]["name"] for e in meta if e["name"] == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in meta if e["name"] == "thread_name"}
    events = [e for e in doc["traceEvents"] if e["ph"] != "M"]
    return events, procs, threads


def by_phase(events: list[dict[str, Any]], procs: dict[int, str]) -> Counter[tuple[str, str]]:
    return Counter((procs[e["pid"]], e["name"].split(" #")[0]) for e in events)


@pytest.mark.timeout(60)
def test_json_events_tracks_and_png(tmp_path: Path) -> None:
    stages, client = simulate()
    json_path, png_path = write_trace(tmp_path / "trace.json", stages, client)
    assert json_path == tmp_path / "trace.json"
    assert png_path == tmp_path / "trace.png"

    events, procs, threads = load(json_path)
    # Client first, then the stages in the order given, each sorted that way.
    assert [procs[p] for p in sorted(procs)] == ["client", *STAGES]
    counts = by_phase(events, procs)
    for name in STAGES:
        for phase in ("wait", "queued", "compute", "send"):
            assert counts[(name, phase)] == N, (name, phase)
    for phase in ("send", "end-to-end", "result"):
        assert counts[("client", phase)] == N, phase
    assert {e["ph"] for e in events} == {"X", "i"}

    # Every event on a named process and thread; stage tracks are receive/compute/send lanes.
    for e in events:
        assert (e["pid"], e["tid"]) in threads
    for (pid, _), tname in threads.items():
        if procs[pid] != "client":
            assert tname.split(" ")[0] in ("receive", "compute", "send")
    computes = [e for e in events if e["name"].startswith("compute")]
    assert all(threads[(e["pid"], e["tid"])] == "compute" for e in computes)
    assert {e["args"]["seq"] for e in computes} == set(range(N))
    assert all(e["args"]["epoch"] == 0 for e in computes)

    # Per thread: sorted by ts, no partial overlap (Perfetto needs events on a track to nest).
    per_thread: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        assert e["ts"] >= 0 and e.get("dur", 0) >= 0
        per_thread[(e["pid"], e["tid"])].append(e)
    for track in per_thread.values():
        ts = [e["ts"] for e in track]
        assert ts == sorted(ts)
        for a, b in itertools.pairwise(track):
            if a["ph"] == "X" and b["ph"] == "X":
                assert b["ts"] >= a["ts"] + a["dur"] - 1e-3
    # s2 is slow, so inputs queue in front of it and its receive track needs extra lanes.
    s2 = next(p for p, n in procs.items() if n == "s2")
    assert sum(1 for (p, _), n in threads.items() if p == s2 and n.startswith("receive")) > 1
    # Times are relative to the earliest event: the first client send.
    assert min(e["ts"] for e in events) == 0

    data = png_path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    img = matplotlib.image.imread(png_path)
    assert img.ndim >= 2
    assert img.shape[:2] == (round(100 * (1 + 0.6 * 4)), 1000)


@pytest.mark.timeout(60)
def test_offsets_bring_stages_onto_the_controller_clock(tmp_path: Path) -> None:
    stages, client = simulate()
    write_trace(tmp_path / "a.json", stages, client, png=False)
    shifted = dict(stages)
    shifted["s2"] = [shift(r, 5.0) for r in stages["s2"]]
    write_trace(tmp_path / "b.json", shifted, client, offsets={"s2": 5.0}, png=False)

    def times(path: Path) -> dict[tuple[str, str], tuple[float, float]]:
        events, procs, _ = load(path)
        return {(procs[e["pid"]], e["name"]): (e["ts"], e.get("dur", 0)) for e in events}

    a, b = times(tmp_path / "a.json"), times(tmp_path / "b.json")
    assert a.keys() == b.keys()
    for key in a:
        assert b[key][0] == pytest.approx(a[key][0], abs=2.0)  # microseconds
        assert b[key][1] == pytest.approx(a[key][1], abs=2.0)
    # s2's compute for an input starts after s1's and before s3's, as on one clock.
    for seq in range(N):
        assert b[("s1", f"compute #{seq}")][0] < b[("s2", f"compute #{seq}")][0]
        assert b[("s2", f"compute #{seq}")][0] < b[("s3", f"compute #{seq}")][0]

    # Without the offset s2 sits 5 s away from everything else.
    write_trace(tmp_path / "c.json", shifted, client, png=False)
    c = times(tmp_path / "c.json")
    assert c[("s2", "compute #0")][0] - c[("s1", "compute #0")][0] > 4.9e6


@pytest.mark.timeout(60)
def test_busiest_stage_is_the_bottleneck() -> None:
    stages, _ = simulate()
    assert busiest_stage(stages) == "s2"
    shifted = {**stages, "s2": [shift(r, 5.0) for r in stages["s2"]]}
    assert busiest_stage(shifted, offsets={"s2": 5.0}) == "s2"
    fast = {**stages, "s2": [{**r, "end": r["start"]} for r in stages["s2"]]}
    assert busiest_stage(fast) in ("s1", "s3")


@pytest.mark.timeout(60)
def test_json_only_and_partial_records(tmp_path: Path) -> None:
    stages, client = simulate()
    # A stage that records no first_part: no wait events, the other phases still there.
    stages["s1"] = [{k: v for k, v in r.items() if k != "first_part"} for r in stages["s1"]]
    # Zero-length phases still give events, of duration 0.
    stages["s3"] = [{**r, "sent": r["end"]} for r in stages["s3"]]
    json_path, png_path = write_trace(str(tmp_path / "only.json"), stages, client, png=False)
    assert png_path is None
    assert not (tmp_path / "only.png").exists()
    events, procs, _ = load(json_path)
    counts = by_phase(events, procs)
    assert counts[("s1", "wait")] == 0
    assert counts[("s1", "queued")] == counts[("s1", "compute")] == N
    sends = [e for e in events if procs[e["pid"]] == "s3" and e["name"].startswith("send")]
    assert len(sends) == N and all(e["dur"] == 0 for e in sends)

    # Stages only, no client: still a trace.
    _, png2 = write_trace(tmp_path / "stages.json", stages, [])
    assert png2 is not None and png2.exists()


@pytest.mark.timeout(60)
def test_refusals(tmp_path: Path) -> None:
    stages, client = simulate()
    with pytest.raises(ValueError, match="no records"):
        write_trace(tmp_path / "t.json", {"s1": [], "s2": []}, [])
    backwards = {**stages, "s2": [*stages["s2"][:-1], {**stages["s2"][-1], "end": 0.0}]}
    with pytest.raises(ValueError, match=r"backwards.*compute"):
        write_trace(tmp_path / "t.json", backwards, client)
    bad_client = [*client[:-1], {**client[-1], "result": client[-1]["send_start"] - 1}]
    with pytest.raises(ValueError, match="backwards"):
        write_trace(tmp_path / "t.json", stages, bad_client)
    with pytest.raises(ValueError, match="does not exist"):
        write_trace(tmp_path / "missing" / "t.json", stages, client)
    with pytest.raises(ValueError, match="finite"):
        write_trace(tmp_path / "t.json", {"s1": [{**stages["s1"][0], "end": float("nan")}]}, [])
    with pytest.raises(ValueError, match="no records"):
        busiest_stage({"s1": []})
    with pytest.raises(ValueError, match="no record has a complete phase"):
        write_trace(tmp_path / "t.json", {"s1": [{"seq": 0, "start": T0}]}, [])
    with pytest.raises(ValueError, match="may not be called"):
        write_trace(tmp_path / "t.json", {"client": stages["s1"]}, client)
    assert not (tmp_path / "t.json").exists()


@pytest.mark.timeout(60)
def test_no_png_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import now fails
    stages, client = simulate()
    json_path, png_path = write_trace(tmp_path / "t.json", stages, client)
    assert json_path.exists() and png_path is None
    assert not (tmp_path / "t.png").exists()
