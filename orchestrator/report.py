"""Where the time goes: per stage, the share of time computing, waiting and blocked; the bottleneck.

Each stage counts, in its compute thread, the seconds spent computing (``busy_s``), waiting for
an input set or its parts (``waiting_s``) and waiting for room to hand an output to its send
thread (``blocked_s``; the send thread waits when the next stage or the link does not take
more). Over an interval those add up to about the interval. The bottleneck is the stage that
computes most of the time; a stage that is mostly blocked is held back by what follows it, and
when every stage mostly waits, the inputs do not come fast enough.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

BUSY = 0.6  # computing at least this share of the time: the pace of the pipeline


def shares(now: Mapping[str, Any], before: Mapping[str, Any] | None) -> dict[str, float]:
    """A stage's busy, waiting and blocked shares of the interval between two stats()."""
    before = before or {}
    keys = ("busy_s", "waiting_s", "blocked_s", "uptime_s", "processed")
    delta = {k: float(now.get(k, 0.0)) - float(before.get(k, 0.0)) for k in keys}
    span = delta["uptime_s"] or 1.0
    return {  # the three are counted apart from the span: keep each within it
        "busy": min(1.0, delta["busy_s"] / span),
        "waiting": min(1.0, delta["waiting_s"] / span),
        "blocked": min(1.0, delta["blocked_s"] / span),
        "inputs": delta["processed"],
        "seconds": span,
    }


def render(
    stages: Mapping[str, Mapping[str, Any]],
    before: Mapping[str, Mapping[str, Any]] | None = None,
    planned: Sequence[float] | None = None,
    destinations: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """The report's text: a table, then the bottleneck and what limits it."""
    rows = [("stage", "worker", "inputs", "busy", "waiting", "blocked", "mean ms", "planned ms")]
    per: dict[str, dict[str, float]] = {}
    for index, (name, data) in enumerate(stages.items()):
        if "unreachable" in data:
            rows.append((name, str(data.get("worker", "?")), "-", "-", "-", "-", "-", "-"))
            continue
        share = per[name] = shares(data, (before or {}).get(name))
        plan_ms = f"{planned[index] * 1e3:.1f}" if planned and index < len(planned) else "-"
        rows.append(
            (
                name,
                str(data.get("worker", "?")),
                f"{share['inputs']:.0f}",
                f"{share['busy']:.0%}",
                f"{share['waiting']:.0%}",
                f"{share['blocked']:.0%}",
                f"{float(data.get('service_mean_s', 0.0)) * 1e3:.1f}",
                plan_ms,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.append(verdict(per, destinations or {}))
    if planned:
        lines.append(_against_plan(stages, planned))
    return "\n".join(lines)


def verdict(
    per: Mapping[str, Mapping[str, float]], destinations: Mapping[str, Sequence[str]]
) -> str:
    """One sentence: which stage sets the pace, and what limits it."""
    if not per or all(s["inputs"] == 0 for s in per.values()):
        return "no inputs went through in this interval: nothing to say yet"
    busiest = max(per, key=lambda n: per[n]["busy"])
    held = max(per, key=lambda n: per[n]["blocked"])
    if per[held]["blocked"] > max(per[busiest]["busy"], 0.3):
        after = ", ".join(dict.fromkeys(destinations.get(held, []))) or "the client"
        return (
            f"bottleneck: after stage {held!r}, which is blocked {per[held]['blocked']:.0%} of the "
            f"time handing on its outputs: {after} (or the link to it) takes them too slowly"
        )
    if per[busiest]["busy"] >= BUSY:
        return (
            f"bottleneck: stage {busiest!r}, computing {per[busiest]['busy']:.0%} of the time "
            f"(compute-bound: a faster worker, or a cut that gives it less, would help)"
        )
    return (
        f"bottleneck: the inputs: every stage waits for them most of the time (the busiest, "
        f"{busiest!r}, computes {per[busiest]['busy']:.0%}); send more at once (window) or feed "
        f"the pipeline faster"
    )


def _against_plan(stages: Mapping[str, Mapping[str, Any]], planned: Sequence[float]) -> str:
    worst_name, worst = "", 0.0
    for (name, data), plan_s in zip(stages.items(), planned, strict=False):
        mean = float(data.get("service_mean_s", 0.0))
        if plan_s > 0 and mean > 0 and abs(mean - plan_s) / plan_s >= worst:
            worst_name, worst = name, abs(mean - plan_s) / plan_s
    names = list(stages)
    slowest = max(range(min(len(planned), len(names))), key=lambda i: planned[i])
    return (
        f"the plan expected stage {names[slowest]!r} to set the pace; measured stage times differ "
        f"from the plan by at most {worst:.0%} ({worst_name})"
    )
