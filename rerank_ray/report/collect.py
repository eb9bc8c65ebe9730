"""The run's metrics, gathered: per-actor aggregates of the stages' call records, on the driver.

The stages' ``CallTrace`` records (``trace.py``) reach one collector actor per run
(``start_collector``); ``RunMetrics`` folds them into per-actor sums as they arrive, so its
memory grows with calls, not rows. The driver asks it for ``progress()`` while the run goes
and for ``summary()`` (the manifest's ``metrics``) and ``detail()`` (the report's series) at
commit.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rerank_ray.trace import collector_name

STAGES = ("tokenize", "score", "write")
LATENCY_RESERVOIR = 20_000  # micro-batch latencies kept per actor for P50/P95
SERIES_POINTS = 200  # at most this many points in the throughput series
INTERVAL_GAP_S = 0.01  # busy intervals closer than this merge


@dataclass
class ActorStats:
    """One actor's (or write worker's) sums for one stage."""

    stage: str
    actor: str
    calls: int = 0
    rows: int = 0
    pairs: int = 0
    tokens: int = 0
    busy: list[list[float]] = field(default_factory=list)  # merged [start, end] intervals
    rejects: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    micro_batches: int = 0
    token_budget: int | None = None
    token_budget_start: int | None = None
    oom_backoffs: int = 0
    peak_memory_mib: float | None = None
    gpu_samples: list[list[float]] = field(default_factory=list)
    gpu_status: str | None = None
    gpu_name: str | None = None
    init: dict[str, Any] | None = None

    def add_call(self, rec: dict[str, Any]) -> None:
        self.calls += 1
        self.rows += rec["rows"]
        self.pairs += rec.get("pairs", 0)
        self.tokens += rec.get("tokens", 0)
        for reason, n in rec.get("rejects", {}).items():
            self.rejects[reason] = self.rejects.get(reason, 0) + n
        self._add_interval(rec["start"], rec["end"])
        for ms in rec.get("latencies_ms", ()):
            self.micro_batches += 1
            if len(self.latencies_ms) < LATENCY_RESERVOIR:
                self.latencies_ms.append(ms)
            else:  # reservoir sampling: every micro-batch equally likely to be kept
                k = random.randrange(self.micro_batches)
                if k < LATENCY_RESERVOIR:
                    self.latencies_ms[k] = ms
        if "token_budget" in rec:
            self.token_budget = rec["token_budget"]
            self.oom_backoffs = max(self.oom_backoffs, rec.get("oom_backoffs", 0))
            self.gpu_status = rec.get("gpu_status", self.gpu_status)
        if rec.get("peak_memory_mib") is not None:
            self.peak_memory_mib = max(self.peak_memory_mib or 0.0, rec["peak_memory_mib"])
        self.gpu_samples.extend(rec.get("gpu_samples", ()))

    def _add_interval(self, start: float, end: float) -> None:
        # Calls of one actor arrive nearly in order; threads of one actor overlap.
        for iv in reversed(self.busy[-4:]):
            if start <= iv[1] + INTERVAL_GAP_S and end >= iv[0] - INTERVAL_GAP_S:
                iv[0], iv[1] = min(iv[0], start), max(iv[1], end)
                return
        self.busy.append([start, end])
        self.busy.sort()

    @property
    def busy_s(self) -> float:
        return sum(e - s for s, e in self.busy)


class RunMetrics:
    """Every stage's records of one run, folded per actor (no Ray: the collector's state)."""

    def __init__(self, started: float, marks: dict[str, float] | None = None) -> None:
        """``started``: the run's start (epoch s); ``marks``: driver times (e.g. Ray ready)."""
        self.started = started
        self.marks = dict(marks or {})
        self.actors: dict[tuple[str, str], ActorStats] = {}
        self.score_calls: list[tuple[float, float, int, int]] = []  # start, end, pairs, tokens

    def add(self, rec: dict[str, Any]) -> None:
        """Fold one ``CallTrace`` record in."""
        stage = rec["stage"]
        if stage.endswith("_init"):
            stats = self._actor(stage.removesuffix("_init"), rec["actor"])
            stats.init = {k: v for k, v in rec.items() if k not in ("stage", "actor", "pid")}
            stats.token_budget_start = rec.get("token_budget")
            stats.gpu_name, stats.gpu_status = rec.get("gpu_name"), rec.get("gpu_status")
            return
        self._actor(stage, rec["actor"]).add_call(rec)
        if stage == "score":
            self.score_calls.append(
                (rec["start"], rec["end"], rec.get("pairs", 0), rec.get("tokens", 0))
            )

    def mark(self, name: str, when: float) -> None:
        """A driver event (``ray_ready``, ``dataset_started``) at ``when`` (epoch s)."""
        self.marks[name] = when

    def _actor(self, stage: str, actor: str) -> ActorStats:
        key = (stage, actor)
        if key not in self.actors:
            self.actors[key] = ActorStats(stage, actor)
        return self.actors[key]

    def _of(self, stage: str) -> list[ActorStats]:
        return [a for a in self.actors.values() if a.stage == stage and a.calls]

    def progress(self) -> dict[str, Any]:
        """What the live progress line shows: rows through scoring, pairs, rejects so far."""
        score = self._of("score")
        rejects: dict[str, int] = {}
        for a in self._of("tokenize"):
            for reason, n in a.rejects.items():
                rejects[reason] = rejects.get(reason, 0) + n
        return {
            "rows_scored_stage": sum(a.rows for a in score),
            "pairs": sum(a.pairs for a in score),
            "tokens": sum(a.tokens for a in score),
            "rejects": sum(rejects.values()),
            "first_score_start": min((a.busy[0][0] for a in score), default=None),
        }

    def summary(self, ended: float) -> dict[str, Any]:
        """The aggregates that go into the manifest (``metrics``): per stage, per actor,
        forward latency, GPU and start-up. Times are seconds since the run started."""
        stages = {s: self._stage_summary(s) for s in STAGES if self._of(s)}
        latencies = [ms for a in self._of("score") for ms in a.latencies_ms]
        gpu_samples = [s for a in self._of("score") for s in a.gpu_samples]
        statuses = sorted({a.gpu_status for a in self._of("score") if a.gpu_status})
        return {
            "wall_s": round(ended - self.started, 3),
            "stages": stages,
            "actors": [self._actor_summary(a) for a in sorted(self.actors.values(), key=_order)],
            "forward_latency_ms": _percentiles(latencies)
            | {"micro_batches": sum(a.micro_batches for a in self._of("score"))},
            "gpu": {
                "samples": len(gpu_samples),
                "utilization_mean_pct": _round(np.mean([s[1] for s in gpu_samples]))
                if gpu_samples
                else None,
                "status": "; ".join(statuses) or None,
            },
            "startup_s": self.startup(),
        }

    def _stage_summary(self, stage: str) -> dict[str, Any]:
        actors = self._of(stage)
        first = min(a.busy[0][0] for a in actors)
        last = max(a.busy[-1][1] for a in actors)
        busy = sum(a.busy_s for a in actors)
        out = {
            "actors": len(actors),
            "calls": sum(a.calls for a in actors),
            "rows": sum(a.rows for a in actors),
            "first_call_s": _round(first - self.started),
            "last_call_end_s": _round(last - self.started),
            "busy_s": _round(busy),
            # Share of the stage's span (first call to last) its actors were busy, on average.
            "busy_fraction": _round(busy / (len(actors) * (last - first)), 3)
            if last > first
            else None,
            "rows_per_busy_s": _round(sum(a.rows for a in actors) / busy, 1) if busy else None,
        }
        if stage == "score":
            pairs, tokens = sum(a.pairs for a in actors), sum(a.tokens for a in actors)
            out |= {"pairs": pairs, "tokens": tokens}
            out["pairs_per_s_in_span"] = _round(pairs / (last - first), 1) if last > first else None
        if stage == "tokenize":
            out["rejects"] = {
                r: sum(a.rejects.get(r, 0) for a in actors)
                for r in sorted({r for a in actors for r in a.rejects})
            }
        return out

    def _actor_summary(self, a: ActorStats) -> dict[str, Any]:
        out: dict[str, Any] = {
            "stage": a.stage,
            "actor": a.actor,
            "calls": a.calls,
            "rows": a.rows,
            "busy_s": _round(a.busy_s),
        }
        if a.busy:
            span = a.busy[-1][1] - a.busy[0][0]
            out["first_call_s"] = _round(a.busy[0][0] - self.started)
            out["busy_fraction"] = _round(a.busy_s / span, 3) if span > 0 else None
        if a.stage == "score":
            out |= {
                "pairs": a.pairs,
                "tokens": a.tokens,
                "gpu": a.gpu_name,
                "token_budget_start": a.token_budget_start,
                "token_budget": a.token_budget,
                "oom_backoffs": a.oom_backoffs,
                "peak_memory_mib": a.peak_memory_mib,
                "gpu_utilization_mean_pct": _round(np.mean([s[1] for s in a.gpu_samples]))
                if a.gpu_samples
                else None,
                "forward_latency_ms": _percentiles(a.latencies_ms),
            }
        if a.init is not None:
            out["setup_seconds"] = a.init.get("setup_seconds")
        return out

    def startup(self) -> dict[str, Any]:
        """Where the time before the first scores went, in seconds since the run started."""
        inits = [a.init for a in self.actors.values() if a.stage == "score" and a.init]
        score = self._of("score")
        out: dict[str, Any] = {k: _round(v - self.started) for k, v in sorted(self.marks.items())}
        starts = [i["process_start"] for i in inits if i.get("process_start")]
        if starts:
            out["scoring_actor_process_start"] = _round(min(starts) - self.started)
        if inits:
            out["scoring_actor_init_start"] = _round(min(i["start"] for i in inits) - self.started)
            out["scoring_actor_ready"] = _round(max(i["end"] for i in inits) - self.started)
            steps: dict[str, float] = {}
            for i in inits:
                for k, v in (i.get("setup_seconds") or {}).items():
                    steps[k] = max(steps.get(k, 0.0), v)
            out["setup_steps_max"] = steps
        if score:
            first = min(score, key=lambda a: a.busy[0][0])
            out["first_score_call_start"] = _round(first.busy[0][0] - self.started)
            out["first_score_call_end"] = _round(first.busy[0][1] - self.started)
        return out

    def detail(self, ended: float) -> dict[str, Any]:
        """What the report plots: the throughput series, busy intervals and GPU samples."""
        return {
            "started": self.started,
            "ended": ended,
            "throughput": self.series(ended),
            # Every actor, an idle one too (no intervals), and its set-up span.
            "busy": {
                f"{a.stage} {a.actor}": [[s - self.started, e - self.started] for s, e in a.busy]
                for a in sorted(self.actors.values(), key=_order)
            },
            "setup": {
                f"{a.stage} {a.actor}": [
                    a.init["start"] - self.started,
                    a.init["end"] - self.started,
                ]
                for a in self.actors.values()
                if a.init
            },
            "gpu_samples": {
                a.actor: [[t - self.started, u, m] for t, u, m in a.gpu_samples]
                for a in self._of("score")
                if a.gpu_samples
            },
            "latencies_ms": [ms for a in self._of("score") for ms in a.latencies_ms],
        }

    def series(self, ended: float) -> dict[str, Any]:
        """Pairs/s and tokens/s over the run, each call's counts spread over its duration."""
        span = max(ended - self.started, 1e-6)
        width = max(1.0, span / SERIES_POINTS)
        n = int(np.ceil(span / width))
        pairs, tokens = np.zeros(n), np.zeros(n)
        for start, end, p, t in self.score_calls:
            a, b = (start - self.started) / width, max(end - self.started, start - self.started)
            b /= width
            lo, hi = int(np.floor(a)), min(int(np.ceil(b)), n)
            for k in range(max(lo, 0), max(hi, lo + 1)):
                if k >= n:
                    break
                share = (min(b, k + 1) - max(a, k)) / (b - a) if b > a else 1.0
                pairs[k] += p * share
                tokens[k] += t * share
        return {
            "bucket_s": width,
            "t_s": [round((k + 0.5) * width, 2) for k in range(n)],
            "pairs_per_s": [round(v / width, 1) for v in pairs],
            "tokens_per_s": [round(v / width, 1) for v in tokens],
        }


def _order(a: ActorStats) -> tuple[int, str]:
    return (STAGES.index(a.stage) if a.stage in STAGES else len(STAGES), a.actor)


def _percentiles(ms: list[float]) -> dict[str, float | None]:
    if not ms:
        return {"p50": None, "p95": None}
    p50, p95 = np.percentile(ms, [50, 95])
    return {"p50": _round(p50, 2), "p95": _round(p95, 2)}


def _round(x, digits: int = 2):
    return None if x is None else round(float(x), digits)


class _Collector:
    """The collector actor: a ``RunMetrics`` behind Ray calls."""

    def __init__(self, started: float, marks: dict[str, float]) -> None:
        self.metrics = RunMetrics(started, marks)

    def add(self, rec: dict[str, Any]) -> None:
        self.metrics.add(rec)

    def mark(self, name: str, when: float) -> None:
        self.metrics.mark(name, when)

    def progress(self) -> dict[str, Any]:
        return self.metrics.progress()

    def finish(self, ended: float) -> tuple[dict[str, Any], dict[str, Any]]:
        return self.metrics.summary(ended), self.metrics.detail(ended)


def start_collector(run_id: str, started: float, marks: dict[str, float] | None = None):
    """Start the run's collector actor (named after the run, so the stages find it). It holds
    no CPU, runs on the driver's node (a worker node may be lost mid-run: the test of a
    removed node lost it there), is never restarted (a lost collector costs the report, not
    the run) and ends with the driver."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    actor = ray.remote(num_cpus=0, max_restarts=0)(_Collector)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return actor.options(name=collector_name(run_id), scheduling_strategy=here).remote(
        started, dict(marks or {})
    )
