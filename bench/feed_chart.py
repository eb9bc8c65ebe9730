"""A chart of bench/feed.py results: pairs/s end to end and while scoring, per job, with
FlagReranker fp16 from the same run.

    python bench/feed_chart.py --out CHART.png FEED.json [FEED.json ...]

Each bar is one job (model, flags, environment variant, GPUs of the run); labels carry the
scoring actors' busy share. Device and date come from the JSON files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from matplotlib.figure import Figure


def bars(paths: list[Path]) -> tuple[list[str], list[float], list[float], list[str]]:
    """(labels, end-to-end pairs/s, pairs/s while scoring, titles) of every job in ``paths``."""
    labels, e2e, span, titles = [], [], [], []
    for path in paths:
        report = json.loads(path.read_text())
        gpus = report.get("gpus", 1)
        titles.append(f"{report['device']} x{gpus}, {report['cpus']} vCPUs, {report['date']}")
        for name, model in report["models"].items():
            for job in model["jobs"]:
                if "error" in job:
                    continue
                env = job.get("env") or {}
                used = 1 if env.get("CUDA_VISIBLE_DEVICES") == "0" else gpus
                variant = " ".join(job["flags"]) or "default"
                # What else made the job differ: an older tree, a Ray Data setting (shortened).
                extra = [
                    f"{k.split('_')[-1] if k.startswith('RAY_') else k}={v}"
                    for k, v in env.items()
                    if k != "CUDA_VISIBLE_DEVICES"
                ]
                blocks = f", {job['batch_rows']} rows" if job.get("batch_rows") else ""
                busy = job.get("scoring_busy_fraction")
                labels.append(
                    f"{name}\n~{job.get('tokens_per_pair') or '?'} tok{blocks}\n{variant}"
                    + (f"\n{' '.join(extra)}" if extra else "")
                    + f"\n{used} GPU"
                    + (f", busy {busy:.0%}" if busy else "")
                )
                e2e.append(job["end_to_end_pairs_per_s"])
                span.append(job["scoring_pairs_per_s_in_span"] or 0)
            peer = model.get("flag_reranker_fp16", {})
            if "pairs_per_s" in peer:
                labels.append(f"{name}\nFlagReranker fp16\n1 GPU")
                e2e.append(peer["pairs_per_s"])
                span.append(peer["pairs_per_s"])
    return labels, e2e, span, titles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("feeds", type=Path, nargs="+", help="feed.json files")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args()
    labels, e2e, span, titles = bars(args.feeds)
    fig = Figure(figsize=(max(8, 1.6 * len(labels)), 5.5))
    ax = fig.subplots()
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], e2e, width=0.4, label="end to end (process wall)")
    ax.bar([i + 0.2 for i in x], span, width=0.4, label="while scoring")
    for i, v in enumerate(e2e):
        ax.annotate(f"{v:,.0f}", (i - 0.2, v), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("pairs/s")
    ax.set_title("\n".join(dict.fromkeys(titles)), fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
