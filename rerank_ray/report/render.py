"""The run report drawn: PNG plots and one self-contained HTML page from a run's metrics.

``render(manifest, detail)`` returns ``{file name: bytes}``: ``report.html`` (its plots inlined
as data URIs, so the page opens alone from disk or S3), the same plots as PNG files, and
``metrics.json`` (the series they were drawn from).
"""

from __future__ import annotations

import base64
import html
import io
import json
from typing import Any

import numpy as np

STAGE_COLORS = {"tokenize": "#4c72b0", "score": "#dd8452", "write": "#55a868"}


def _figure(height: float = 3.6):
    from matplotlib.figure import Figure  # no pyplot: no global state, no display

    fig = Figure(figsize=(9, height), dpi=100)
    return fig, fig.add_subplot()


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def outcomes_png(manifest: dict[str, Any]) -> bytes:
    """Rows by outcome: scored (truncated among them), rejected and filtered by reason."""
    bars = [("scored", manifest["rows_scored"], "#55a868")]
    bars.append(("  of which truncated", manifest["rows_truncated"], "#8fbc8f"))
    bars += [(f"rejected: {r}", n, "#c44e52") for r, n in manifest["rejects_by_reason"].items()]
    bars += [(f"filtered: {r}", n, "#8c8c8c") for r, n in manifest["filtered_by_reason"].items()]
    fig, ax = _figure(0.9 + 0.35 * len(bars))
    labels, counts, colors = zip(*reversed(bars), strict=True)
    ax.barh(labels, counts, color=colors)
    for y, n in enumerate(counts):
        ax.text(n, y, f" {n:,}", va="center")
    ax.set_xlabel("rows")
    ax.set_title(f"{manifest['rows_read']:,} rows read")
    ax.margins(x=0.15)
    return _png(fig)


def throughput_png(detail: dict[str, Any]) -> bytes:
    """Pairs/s and tokens/s over the run."""
    series = detail["throughput"]
    fig, ax = _figure()
    ax.plot(series["t_s"], series["pairs_per_s"], color="#dd8452", label="pairs/s")
    ax.set_xlabel("seconds since the run started")
    ax.set_ylabel("pairs/s", color="#dd8452")
    twin = ax.twinx()
    twin.plot(series["t_s"], series["tokens_per_s"], color="#4c72b0", alpha=0.6, label="tokens/s")
    twin.set_ylabel("tokens/s", color="#4c72b0")
    ax.set_title(f"Scoring throughput ({series['bucket_s']:.3g} s buckets)")
    return _png(fig)


def busy_png(detail: dict[str, Any]) -> bytes:
    """When each actor was busy (a bar per call, merged); white is idle."""
    rows = list(detail["busy"].items())
    fig, ax = _figure(1.0 + 0.28 * max(len(rows), 3))
    for y, (name, intervals) in enumerate(reversed(rows)):
        stage = name.split(" ", 1)[0]
        if name in detail.get("setup", {}):
            start, end = detail["setup"][name]
            ax.broken_barh([(start, end - start)], (y - 0.4, 0.8), color="#dddddd", hatch="//")
        ax.broken_barh(
            [(s, e - s) for s, e in intervals],
            (y - 0.4, 0.8),
            color=STAGE_COLORS.get(stage, "#8c8c8c"),
        )
    ax.set_yticks(range(len(rows)), [n for n, _ in reversed(rows)], fontsize=7)
    ax.set_xlim(0, detail["ended"] - detail["started"])
    ax.set_xlabel("seconds since the run started")
    ax.set_title("Busy time per actor (gaps are idle; hatched: actor set-up)")
    return _png(fig)


def gpu_png(detail: dict[str, Any]) -> bytes:
    """GPU utilisation and memory used (NVML) of each scoring actor's GPU."""
    fig, ax = _figure()
    twin = ax.twinx()
    for actor, samples in detail["gpu_samples"].items():
        t, util, mem = np.asarray(samples).T
        ax.plot(t, util, label=f"{actor} utilisation")
        twin.plot(t, mem / 1024, ls="--", alpha=0.6, label=f"{actor} memory")
    ax.set_ylim(0, 105)
    ax.set_ylabel("GPU utilisation %")
    twin.set_ylabel("memory used GiB (dashed)")
    ax.set_xlabel("seconds since the run started")
    ax.set_xlim(0, detail["ended"] - detail["started"])
    ax.legend(loc="lower right", fontsize=7)
    ax.set_title("GPU utilisation and memory (NVML samples)")
    return _png(fig)


def latency_png(detail: dict[str, Any], p50: float, p95: float) -> bytes:
    """The distribution of micro-batch forward latency, P50 and P95 marked."""
    fig, ax = _figure()
    ax.hist(detail["latencies_ms"], bins=50, color="#dd8452")
    ax.axvline(p50, color="k", ls="--", label=f"P50 {p50:.3g} ms")
    ax.axvline(p95, color="#c44e52", ls="--", label=f"P95 {p95:.3g} ms")
    ax.set_xlabel("ms per micro-batch")
    ax.set_ylabel("micro-batches")
    ax.legend()
    ax.set_title("Forward latency per micro-batch")
    return _png(fig)


def startup_png(startup: dict[str, Any]) -> bytes:
    """The start-up as consecutive phases up to the first scores."""
    phases = startup_phases(startup)
    fig, ax = _figure(1.6 + 0.3 * len(phases))
    for y, (_name, start, end) in enumerate(reversed(phases)):
        ax.barh(y, end - start, left=start, color="#4c72b0")
        ax.text(end, y, f" {end - start:.1f} s", va="center", fontsize=8)
    ax.set_yticks(range(len(phases)), [p[0] for p in reversed(phases)], fontsize=8)
    ax.set_xlabel("seconds since the run started")
    ax.set_title("Start-up until the first scores")
    ax.margins(x=0.12)
    return _png(fig)


def startup_phases(startup: dict[str, Any]) -> list[tuple[str, float, float]]:
    """``(phase, start s, end s)`` from the run's start to the first scoring call's end."""
    points = [
        ("up-front checks (input, output, model)", "checks_done"),
        ("Ray start", "ray_ready"),
        ("plan and schedule the scoring actor", "scoring_actor_process_start"),
        ("actor process start and imports", "scoring_actor_init_start"),
        ("model load and autotune", "scoring_actor_ready"),
        ("wait for the first tokenized block", "first_score_call_start"),
        ("first scoring call", "first_score_call_end"),
    ]
    out, last = [], 0.0
    for name, key in points:
        if startup.get(key) is not None:
            out.append((name, last, max(startup[key], last)))
            last = max(startup[key], last)
    return out


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in columns) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_fmt(x)}" for k, x in v.items())
    return str(v)


def render(manifest: dict[str, Any], detail: dict[str, Any]) -> dict[str, bytes]:
    """The report's files: ``report.html``, its PNGs and ``metrics.json``."""
    m = manifest["metrics"]
    pngs = {"outcomes.png": outcomes_png(manifest)}
    sections = [("Rows by outcome", "outcomes.png", "")]
    if detail["throughput"]["t_s"] and m["stages"].get("score"):
        pngs["throughput.png"] = throughput_png(detail)
        sections.append(("Throughput", "throughput.png", ""))
    stage_rows = [{"stage": s, **v} for s, v in m["stages"].items()]
    pngs["busy.png"] = busy_png(detail)
    sections.append(
        (
            "Busy time per stage and actor",
            "busy.png",
            _table(
                stage_rows,
                ["stage", "actors", "calls", "rows", "busy_s", "busy_fraction", "rows_per_busy_s"],
            ),
        )
    )
    scorers = [
        a
        | {
            "latency_p50_ms": a["forward_latency_ms"]["p50"],
            "latency_p95_ms": a["forward_latency_ms"]["p95"],
        }
        for a in m["actors"]
        if a["stage"] == "score"
    ]
    scorer_table = _table(
        scorers,
        [
            "actor",
            "gpu",
            "token_budget_start",
            "token_budget",
            "oom_backoffs",
            "peak_memory_mib",
            "gpu_utilization_mean_pct",
            "latency_p50_ms",
            "latency_p95_ms",
            "pairs",
        ],
    )
    if detail["gpu_samples"]:
        pngs["gpu.png"] = gpu_png(detail)
        sections.append(("Scoring actors and GPU utilisation", "gpu.png", scorer_table))
    else:
        why = m["gpu"]["status"] or "no samples were taken"
        sections.append(
            (
                "Scoring actors and GPU utilisation",
                None,
                f"<p class=note>No GPU utilisation: {html.escape(why)}.</p>{scorer_table}",
            )
        )
    latency = m["forward_latency_ms"]
    if detail["latencies_ms"]:
        pngs["latency.png"] = latency_png(detail, latency["p50"], latency["p95"])
        sections.append(("Forward latency", "latency.png", ""))
    pngs["startup.png"] = startup_png(m["startup_s"])
    sections.append(("Start-up", "startup.png", _table([m["startup_s"]], list(m["startup_s"]))))
    files = dict(pngs)
    files["report.html"] = _html(manifest, sections, pngs).encode()
    files["metrics.json"] = json.dumps({"summary": m, "detail": detail}, default=float).encode()
    return files


def _html(manifest, sections, pngs) -> str:
    m = manifest["metrics"]
    headline = _table(
        [
            {
                "rows read": manifest["rows_read"],
                "scored": manifest["rows_scored"],
                "rejected": manifest["rows_rejected"],
                "filtered": manifest["rows_filtered"],
                "pairs/s end to end": manifest["pairs_per_s"],
                "wall s": manifest["wall_time_s"],
                "forward P50 ms": m["forward_latency_ms"]["p50"],
                "forward P95 ms": m["forward_latency_ms"]["p95"],
                "GPU util mean %": m["gpu"]["utilization_mean_pct"],
            }
        ],
        [
            "rows read",
            "scored",
            "rejected",
            "filtered",
            "pairs/s end to end",
            "wall s",
            "forward P50 ms",
            "forward P95 ms",
            "GPU util mean %",
        ],
    )
    parts = []
    for title, png, extra in sections:
        img = ""
        if png:
            data = base64.b64encode(pngs[png]).decode()
            img = f'<img alt="{html.escape(title)}" src="data:image/png;base64,{data}">'
        parts.append(f"<section><h2>{html.escape(title)}</h2>{img}{extra}</section>")
    title = f"rerank-ray run {manifest['run_id']}"
    return (
        f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;max-width:960px;margin:auto}"
        "table{border-collapse:collapse;font-size:13px;margin:8px 0}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
        "img{max-width:100%}.note{color:#a33}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        f"<p>{html.escape(manifest['input'])} &rarr; {html.escape(manifest['output'])}, "
        f"model {html.escape(str(manifest['model']))}, Ray {manifest['ray_version']}</p>"
        f"{headline}{''.join(parts)}</body></html>"
    )
