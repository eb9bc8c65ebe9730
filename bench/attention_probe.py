"""Probe: tiles of the Triton varlen attention (``kernels.varlen_attention``) on the scorer's
micro-batches of the bench workload, against the fixed default tile and FA2's varlen_attn.

    PYTHONPATH=. python3 bench/attention_probe.py --out "$OUT"

The scorer sorts each block of rows by length and cuts micro-batches of <= 65,536 tokens; this
does the same on ``--pairs`` pairs and times one layer's attention (16 heads x 64) over all of
them for each tile (rows, cols, stages, warps). Writes ``attention_probe.json``. (The run
committed as results/2026-11-22-h200-attention-tiles.json also tried loading K as stored
instead of transposed, at commit 89ffb19: no difference, since removed.)
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.workload import make_workload  # noqa: E402
from rerank_ray import kernels  # noqa: E402
from rerank_ray.autotune import cut_by_budget  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--pairs", type=int, default=8192)
    p.add_argument("--budget", type=int, default=65536)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from torch.nn.attention.varlen import varlen_attn
    from triton.testing import do_bench

    work = make_workload(args.pairs)
    lengths = np.diff(work.tokenized()[1])
    batches = []
    for start in range(0, len(lengths), 2048):  # the scorer's blocks, sorted, budget cuts
        block = np.sort(lengths[start : start + 2048])
        batches += [block[a:b] for a, b in cut_by_budget(block, args.budget, padded=False)]
    gen = torch.Generator(device="cpu").manual_seed(0)
    data = []
    for lens in batches:
        cu = torch.tensor(np.concatenate(([0], np.cumsum(lens))), dtype=torch.int32).cuda()
        qkv = torch.randn(int(lens.sum()), 3 * 1024, generator=gen).to("cuda", torch.float16)
        data.append((lens, cu, qkv))
    report = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "micro_batches": len(batches),
        "tokens": int(sum(int(b.sum()) for b in batches)),
        "ms_per_layer_all_micro_batches": {},
        "max_abs_vs_fa2": {},
        "errors": {},
    }

    def fa2():
        for lens, cu, qkv in data:
            q, k, v = qkv.view(-1, 3, 16, 64).unbind(1)
            m = int(lens.max())
            varlen_attn(q, k, v, cu, cu, m, m)

    ref = []
    for lens, cu, qkv in data:
        q, k, v = qkv.view(-1, 3, 16, 64).unbind(1)
        m = int(lens.max())
        ref.append(varlen_attn(q, k, v, cu, cu, m, m).reshape(len(qkv), -1))
    report["ms_per_layer_all_micro_batches"]["fa2_varlen_attn"] = round(do_bench(fa2), 4)
    tiles = [(64, 64, 3, 4)] + [
        t
        for t in itertools.product((64, 128), (32, 64, 128), (2, 3), (4, 8))
        if t != (64, 64, 3, 4)
    ]
    for tile in tiles:
        name = "x".join(str(int(v)) for v in tile)
        try:
            works = [
                torch.from_numpy(kernels.attention_work(lens, tile[0])).cuda()
                for lens, _, _ in data
            ]

            def run(tile=tile, works=works):
                return [
                    kernels.varlen_attention(qkv, cu, 16, work=w, tile=tile)
                    for (_, cu, qkv), w in zip(data, works, strict=True)
                ]

            outs = run()
            err = max(
                (o.float() - r.float()).abs().max().item() for o, r in zip(outs, ref, strict=True)
            )
            report["max_abs_vs_fa2"][name] = err
            report["ms_per_layer_all_micro_batches"][name] = round(do_bench(run), 4)
        except Exception as e:  # noqa: BLE001 (a tile that does not compile is a result too)
            report["errors"][name] = f"{type(e).__name__}: {str(e)[:200]}"
        print(
            name,
            report["ms_per_layer_all_micro_batches"].get(name),
            report["errors"].get(name),
            flush=True,
        )
    (out / "attention_probe.json").write_text(json.dumps(report, indent=1))
    best = sorted(report["ms_per_layer_all_micro_batches"].items(), key=lambda kv: kv[1])[:8]
    print("best", best)


if __name__ == "__main__":
    main()
