"""How long ``ray.init`` takes to start a local instance, with and without Ray's dashboard
(the job starts its own local instance without it), alternating in one process tree.

    python bench/ray_start.py --reps 3 --out OUT.json

Each start runs in a fresh interpreter that imports Ray first, so only ``ray.init`` and
``ray.shutdown`` are timed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

PROBE = """
import json, sys, time
import ray
t = time.perf_counter()
ray.init(num_cpus=4, include_dashboard=sys.argv[1] == "1", log_to_driver=False)
started = time.perf_counter() - t
t = time.perf_counter()
ray.shutdown()
print(json.dumps({"init_s": round(started, 2), "shutdown_s": round(time.perf_counter() - t, 2)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    runs = []
    for rep in range(args.reps):
        for dashboard in (True, False):
            done = subprocess.run(
                [sys.executable, "-c", PROBE, "1" if dashboard else "0"],
                capture_output=True,
                text=True,
                check=True,
            )
            timing = json.loads(done.stdout.strip().splitlines()[-1])
            runs.append({"rep": rep, "dashboard": dashboard, **timing})
            print(json.dumps(runs[-1]), flush=True)
    report = {
        "what": "ray.init of a local instance (num_cpus=4), with and without the dashboard",
        "date": datetime.date.today().isoformat(),
        "device": f"{platform.machine()}, {os.cpu_count()} logical CPUs",
        "runs": runs,
    }
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
