"""Where an actor's start-up goes, step by step, each step in a fresh process.

    PYTHONPATH=. python3 bench/startup_probe.py --out "$OUT"

Saves the full-size bge-reranker-v2-m3 architecture (random weights, fp16) and the
benchmark's tokenizer, then times in fresh Python processes (as a Ray worker starts): the
imports a tokenize and a scoring actor need, the tokenize stage's set-up, the scoring stage's
set-up with its own breakdown, and the steps of a model load (weights read to host memory,
copy to the GPU, CUDA context). Also records whether the installed packages carry compiled
bytecode (``__pycache__``), since without it every fresh process compiles them again.
Writes ``startup.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

STEPS = {
    "python_bare": "pass",
    "import_torch": "import torch",
    "import_ray_data": "import ray.data",
    "import_rerank_ray_pipeline": "import rerank_ray.pipeline",
    "import_transformers_autotokenizer": "from transformers import AutoTokenizer",
    "tokenize_stage_setup": (
        "from rerank_ray.tokenize import TokenizeStage\n"
        "TokenizeStage({model!r}, max_length=512, query_max_length=384)"
    ),
    "cuda_context": "import torch\ntorch.cuda.init()\ntorch.empty(1, device='cuda')",
    "load_model_host": (
        "import torch\nfrom transformers import AutoModelForSequenceClassification\n"
        "AutoModelForSequenceClassification.from_pretrained({model!r}, dtype=torch.float16)"
    ),
    "load_model_to_gpu": (
        "import torch\nfrom rerank_ray.model import load_cross_encoder\n"
        "load_cross_encoder({model!r}, device=torch.device('cuda'), dtype=torch.float16)"
    ),
    "score_stage_setup": (
        "import json\nfrom rerank_ray.scorer import ScoreStage\n"
        "s = ScoreStage({model!r}, device='cuda', dtype='float16', token_budget=65536)\n"
        "print('SETUP', json.dumps(s.setup_seconds))"
    ),
}


def timed_process(code: str, repeats: int) -> dict:
    walls, extra = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO
        )
        walls.append(round(time.perf_counter() - t0, 2))
        if done.returncode != 0:
            return {"error": done.stderr[-1500:]}
        for line in done.stdout.splitlines():
            if line.startswith("SETUP "):
                extra = json.loads(line[6:])
    out = {"seconds": walls}
    if extra:
        out["setup_seconds"] = extra
    return out


def bytecode_state() -> dict:
    import importlib.util
    import os

    out = {}
    for name in ("torch", "transformers", "ray", "pyarrow", "tokenizers"):
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin:
            continue
        folder = Path(spec.origin).parent
        cache = folder / "__pycache__"
        out[name] = {
            "path": str(folder),
            "has_pycache": cache.is_dir() and any(cache.iterdir()),
            "writable": os.access(folder, os.W_OK),
        }
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    import torch

    from bench.run_bench import build_model
    from bench.workload import save_synthetic_tokenizer

    model_dir = tempfile.mkdtemp(prefix="bge-random-")
    build_model(torch.float16).save_pretrained(model_dir)
    save_synthetic_tokenizer(model_dir)
    torch.cuda.empty_cache()
    report = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "repeats_per_step": args.repeats,
        "bytecode": bytecode_state(),
        "steps": {},
    }
    for name, code in STEPS.items():
        report["steps"][name] = timed_process(code.format(model=model_dir), args.repeats)
        print(name, report["steps"][name], flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "startup.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
