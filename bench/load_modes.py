"""Load run of the labeling mode on CPU: wall time, pairs/s and the driver's peak RSS at
sizes an order of magnitude apart, for the code of this checkout and, optionally, of another.

Each run is a fresh Python process (the driver: it starts its own local Ray instance) so its
peak RSS (``VmHWM`` of ``/proc/<pid>/status``, plus psutil samples of the driver alone) is
that run's. The code under test comes from ``--code`` (a directory holding ``rerank_ray/``,
e.g. ``git archive 38c60bb rerank_ray | tar -x -C /tmp/before``)::

    python bench/load_modes.py --sizes 40000 400000 --code . --code /tmp/before \\
        --out bench/results/DATE-cpu-modes-driver-rss.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MIB = 1024**2
REPO = Path(__file__).resolve().parents[1]


def vm_hwm_bytes(pid: int | str = "self") -> int:
    """Peak resident set size of a process (Linux ``VmHWM``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(args: argparse.Namespace) -> None:
    """One labeling run in this process; prints one JSON line with its figures."""
    import psutil

    from rerank_ray.config import JobConfig
    from rerank_ray.modes.config import LabelConfig
    from rerank_ray.modes.run import run_labeling

    peak = {"rss": 0}
    stop = threading.Event()

    def sample() -> None:
        me = psutil.Process()
        while not stop.is_set():
            peak["rss"] = max(peak["rss"], me.memory_info().rss)
            stop.wait(0.5)

    threading.Thread(target=sample, daemon=True).start()
    job = JobConfig(
        input=args.input,
        output=args.output,
        model=args.model,
        device="cpu",
        batch_rows=2048,
        num_actors=2,
        tokenize_actors=1,
        run_id="bench",
    )
    mode = LabelConfig(label_source="given", hard_negative_min_rank=1, margin=0.0)
    started = time.time()
    report = run_labeling(job, mode)
    wall = time.time() - started
    stop.set()
    exports = report["exports"]
    print(
        json.dumps(
            {
                "rows": args.rows,
                "wall_time_s": round(wall, 1),
                "pairs_per_s": round(args.rows / wall, 1),
                "driver_peak_rss_mib": round(vm_hwm_bytes() / MIB),
                "driver_peak_rss_sampled_mib": round(peak["rss"] / MIB),
                "rows_scored": report["rows_scored"],
                "flagembedding_records": exports["flagembedding_jsonl"]["rows"],
                "exports": {
                    name: {k: v for k, v in e.items() if k in ("rows", "files", "path")}
                    for name, e in exports.items()
                    if name != "score_histogram_png"
                },
            }
        ),
        flush=True,
    )


def run_one(code: Path, rows: int, work: Path, model: Path) -> dict:
    """Generate the input, run the child on ``code``'s rerank_ray, return its figures."""
    from bench.load_cpu import write_shards

    inp, out = work / f"in-{rows}", work / f"out-{rows}-{code.name}"
    if not inp.exists():
        write_shards(inp, rows, shards=max(4, rows // 20_000), positives=True)
    env = {**os.environ, "PYTHONPATH": str(code), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, __file__, "--child", "--rows", str(rows), "--input", str(inp)]
    cmd += ["--output", str(out), "--model", str(model)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=code)
    lines = [line for line in done.stdout.splitlines() if line.startswith('{"rows"')]
    if done.returncode or not lines:
        raise RuntimeError(f"run of {rows} rows on {code} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def code_revision(code: Path) -> str:
    marker = code / "REVISION"
    if marker.exists():
        return marker.read_text().strip()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=code, capture_output=True, text=True)
    return head.stdout.strip() or str(code)


def summarize(results: list[dict]) -> dict:
    """Per checkout: driver peak RSS by size, and the largest size's over the smallest's."""
    summary = {}
    for code in dict.fromkeys(r["code"] for r in results):
        runs = sorted((r for r in results if r["code"] == code), key=lambda r: r["rows"])
        small, large = runs[0], runs[-1]
        summary[code] = {
            "revisions": sorted({r["revision"] for r in runs}),
            "driver_peak_rss_mib": {str(r["rows"]): r["driver_peak_rss_mib"] for r in runs},
            "pairs_per_s": {str(r["rows"]): r["pairs_per_s"] for r in runs},
            "larger_over_smaller": round(
                large["driver_peak_rss_mib"] / small["driver_peak_rss_mib"], 3
            ),
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[40_000, 400_000])
    parser.add_argument("--code", type=Path, action="append", help="Checkout(s) to measure.")
    parser.add_argument("--out", type=Path, help="JSON file to write.")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    sys.path.insert(0, str(REPO))
    from bench.load_cpu import device
    from rerank_ray.tiny_model import build_tiny_reranker

    work = Path(tempfile.mkdtemp(prefix="load-modes-"))
    model = build_tiny_reranker(work / "model")
    results = []
    for code in args.code or [REPO]:
        for rows in args.sizes:
            result = {"code": str(code), "revision": code_revision(code)}
            result |= run_one(code.resolve(), rows, work, model)
            print(json.dumps(result), flush=True)
            results.append(result)
    record = {
        "date": dt.date.today().isoformat(),
        "device": device(),
        "what": "labeling mode (label_source given), tiny 2-layer XLM-R on CPU, local Ray "
        "instance started by the driver; driver peak RSS = VmHWM of the driver process",
        "settings": {"batch_rows": 2048, "num_actors": 2, "tokenize_actors": 1},
        "runs": results,
        "summary": summarize(results),
    }
    text = json.dumps(record, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
