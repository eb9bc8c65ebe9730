"""The whole job on CPU, fp32 against int8, as a user runs it (``rerank-ray run --device cpu``,
its own Ray start): English prose pairs through ``bench/feed.py``'s job runner.

    python bench/cpu_job.py MODEL_DIR OUT.json

MODEL_DIR: the trained MiniLM cross-encoder (``bench/cpu_bench.py build-model``).
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import feed  # noqa: E402
from tokenize_rate import corpus_lines, prose_words  # noqa: E402


def cpu_name() -> str:
    """The CPU's model name (Linux), else the machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("model", type=Path, help="MODEL_DIR (module docstring)")
    parser.add_argument("out", type=Path, help="the JSON report to write")
    args = parser.parse_args()
    model = args.model
    work = Path("/tmp/cpujob")
    shutil.rmtree(work, ignore_errors=True)
    rows = feed.write_input(work / "input", prose_words(corpus_lines()), 4096)
    report = {
        "what": "whole job on CPU (rerank-ray run --device cpu, own Ray start), trained MiniLM cross-encoder",
        "date": datetime.date.today().isoformat(),
        "device": f"{cpu_name()}, {os.cpu_count()} logical CPUs",
        "model": f"{model} (all-MiniLM-L6-v2 trained encoder + seeded head)",
        "pairs": rows,
        "load_before": os.getloadavg(),
        "runs": [],
    }
    for rep in range(2):
        for flags in ([], ["--precision", "int8"]):
            out = work / f"out-{rep}-{len(flags)}"
            r = feed.run_job(model, work / "input", out, ["--device", "cpu", *flags], {})
            r.pop("gpu_utilization_mean_pct", None)
            report["runs"].append(r)
            print(
                json.dumps(
                    {
                        k: r.get(k)
                        for k in (
                            "flags",
                            "wall_s",
                            "end_to_end_pairs_per_s",
                            "scoring_pairs_per_s_in_span",
                            "scoring_busy_fraction",
                            "tokenize_actors_used",
                            "error",
                        )
                    }
                ),
                flush=True,
            )
    report["load_after"] = os.getloadavg()
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
