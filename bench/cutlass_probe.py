"""Probe: the feed-forward up-projection with bias + exact (erf) GELU in a CUTLASS 3 Hopper
warp-specialized GEMM's epilogue (``bench/cutlass/gelu_gemm.cu``), against cuBLAS + the GELU
pass (PyTorch's and ``kernels.gelu_``). Needs nvcc and the CUTLASS headers (the GPU machine has
nvcc 13.0; the headers travel as ``.devpkgs/cutlass.tar.xz``, from the ``nvidia-cutlass`` 4.2
wheel's ``cutlass_library/source``). Not part of the package: a probe of whether such a kernel
is worth building.

    PYTHONPATH=. python3 bench/cutlass_probe.py --out "$OUT" --cutlass /tmp/cutlass

Builds each configuration (tile, cluster, cooperative or ping-pong schedule; GELU or identity
epilogue) in parallel, then checks and times it at 65,487 x 1024 -> 4096. Writes
``cutlass_probe.json``.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CONFIGS = {  # name: (tile M, tile N, cluster M, cluster N, ping-pong, activation)
    "coop_256x128_c1x2_gelu": (256, 128, 1, 2, 0, 1),
    "coop_256x128_c2x1_gelu": (256, 128, 2, 1, 0, 1),
    "coop_128x256_c2x1_gelu": (128, 256, 2, 1, 0, 1),
    "coop_128x256_c1x2_gelu": (128, 256, 1, 2, 0, 1),
    "pingpong_128x128_c1x2_gelu": (128, 128, 1, 2, 1, 1),
    "pingpong_128x128_c2x1_gelu": (128, 128, 2, 1, 1, 1),
    "coop_256x128_c1x2_identity": (256, 128, 1, 2, 0, 0),
    "pingpong_128x128_c1x2_identity": (128, 128, 1, 2, 1, 0),
    # the second run: the cheaper erf in the epilogue
    "coop_256x128_c2x1_gelu_fast_erf": (256, 128, 2, 1, 0, 2),
    "coop_128x256_c2x1_gelu_fast_erf": (128, 256, 2, 1, 0, 2),
    "pingpong_128x128_c1x2_gelu_fast_erf": (128, 128, 1, 2, 1, 2),
    "pingpong_128x128_c2x1_gelu_fast_erf": (128, 128, 2, 1, 1, 2),
    "pingpong_128x128_c2x1_identity": (128, 128, 2, 1, 1, 0),
}


def build(cutlass: Path, build_dir: Path, only: str | None) -> dict:
    src = Path(__file__).with_name("cutlass") / "gelu_gemm.cu"
    procs = {}
    names = only.split(",") if only else list(CONFIGS)
    for name in names:
        tm, tn, cm, cn, pp, act = CONFIGS[name]
        cmd = [
            "nvcc", "-std=c++17", "-O3", "-arch=sm_90a", "-shared", "-Xcompiler", "-fPIC",
            "--expt-relaxed-constexpr", "-DNDEBUG",
            f"-I{cutlass / 'include'}", f"-I{cutlass / 'tools/util/include'}",
            f"-DTILE_M={tm}", f"-DTILE_N={tn}", f"-DCLUSTER_M={cm}", f"-DCLUSTER_N={cn}",
            f"-DPINGPONG={pp}", f"-DACT={act}", "-o", str(build_dir / f"{name}.so"), str(src),
        ]  # fmt: skip
        procs[name] = (
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT),
            time.time(),
        )
    out = {}
    for name, (proc, t0) in procs.items():
        text = proc.communicate()[0].decode(errors="replace")
        out[name] = {"rc": proc.returncode, "seconds": round(time.time() - t0, 1)}
        if proc.returncode:
            out[name]["log_tail"] = text[-1500:]
        print(name, out[name]["rc"], out[name]["seconds"], flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument(
        "--cutlass", required=True, help="directory with include/ and tools/util/include"
    )
    p.add_argument("--tokens", type=int, default=65487)
    p.add_argument("--only", default=None, help="comma list of CONFIGS names to build")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    build_dir = Path("/tmp/cutlass_probe_build")
    build_dir.mkdir(exist_ok=True)
    from bench.gelu_probe import recorder, up_projection
    from rerank_ray import kernels

    report = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "nvcc": subprocess.run(["nvcc", "--version"], capture_output=True, text=True)
        .stdout.strip()
        .splitlines()[-1],
        "shape": {"M": args.tokens, "K": 1024, "N": 4096},
        "build": build(Path(args.cutlass), build_dir, args.only),
        "ms": {},
        "max_abs_vs_eager": {},
        "max_abs_vs_fp32": {},
        "errors": {},
    }
    x, w, b, ref, ref32 = up_projection(args.tokens)
    m, k, n = args.tokens, 1024, 4096
    lin = F.linear(x, w, b)
    record = recorder(report, ref, ref32)

    record("cublas_bias_only", lambda: F.linear(x, w, b), want=lin, want32=lin.float())
    record("cublas_then_torch_gelu_", lambda: torch.ops.aten.gelu_(F.linear(x, w, b)))
    record("cublas_then_triton_gelu_", lambda: kernels.gelu_(F.linear(x, w, b)))
    record("cublas_tanh_epilogue", lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True))
    for name, info in report["build"].items():
        if info["rc"]:
            continue
        lib = ctypes.CDLL(str(build_dir / f"{name}.so"))
        lib.workspace_size.restype = ctypes.c_size_t
        lib.workspace_size.argtypes = [ctypes.c_int] * 3
        lib.run.restype = ctypes.c_int
        lib.run.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 3 + [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]  # fmt: skip
        ws = torch.empty(max(1, lib.workspace_size(m, n, k)), device="cuda", dtype=torch.uint8)

        def fn(lib=lib, ws=ws):
            y = torch.empty(m, n, device="cuda", dtype=torch.float16)
            rc = lib.run(x.data_ptr(), w.data_ptr(), b.data_ptr(), y.data_ptr(), m, n, k,
                         ws.data_ptr(), ws.numel(), torch.cuda.current_stream().cuda_stream)  # fmt: skip
            if rc:
                raise RuntimeError(f"CUTLASS run returned {rc}")
            return y

        if name.endswith("identity"):
            record(name, fn, want=lin, want32=lin.float())
        else:
            record(name, fn)
    (out / "cutlass_probe.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "build"}, indent=1))


if __name__ == "__main__":
    main()
