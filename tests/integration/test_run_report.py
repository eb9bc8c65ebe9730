"""The CLI as a user runs it, on a local Ray instance: the run report is written with the
manifest, its numbers agree with the manifest and the output, it opens in a real headless
browser, and a healthy run's stderr has no WARNING or ERROR line."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from rerank_ray.report import report_path
from tests.conftest import make_pairs
from tests.integration.test_pipeline_local import write_shards

pytestmark = pytest.mark.integration

# A WARNING/ERROR line of Python logging (ours and Ray's), of Ray's C++ core worker
# ("[... E 123 123] core_worker.cc"), or a traceback.
BAD_LINE = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|^\[[^\]]* [EWF] \d+ \d+\]|Traceback")


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def cli_run(tiny_model_dir, tmp_path_factory):
    """One healthy CLI run (two rows rejected for empty text: data, not a failure)."""
    tmp = tmp_path_factory.mktemp("report")
    table = make_pairs(1200)
    bad = pa.table(
        {
            "query_id": ["e1", "e2"],
            "query": ["", "ok"],
            "doc_id": ["x1", "x2"],
            "doc": ["doc", ""],
            "retrieval_rank": [1, 1],
        }
    )
    write_shards(pa.concat_tables([table, bad]), tmp / "in", shards=3)
    out = tmp / "out"
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "RERANK_RAY_CACHE": str(tmp / "cache")}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, "-m", "rerank_ray.cli", "run", "--input", str(tmp / "in"),
         "--output", str(out), "--model", str(tiny_model_dir), "--device", "cpu",
         "--batch-rows", "256", "--tokenize-actors", "1"],
        capture_output=True, text=True, env=env, timeout=600, cwd=os.getcwd(),
    )  # fmt: skip
    return done, out, tmp


def test_healthy_run_prints_no_warning_or_error(cli_run):
    done, _, _ = cli_run
    assert done.returncode == 0, done.stderr[-3000:]
    bad = [line for line in done.stderr.splitlines() if BAD_LINE.search(line)]
    assert not bad, "\n".join(bad)
    assert "rerank-ray progress: " in done.stderr  # the job's own progress line
    assert "Parquet dataset sampling" not in done.stderr  # Ray Data's bars: --verbose only
    assert done.stdout.strip().startswith("rerank-ray run ")


def test_report_numbers_agree_with_manifest_and_output(cli_run):
    done, out, _ = cli_run
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((out / "_SUCCESS").read_text())
    scored = pads.dataset(str(out), format="parquet", partitioning="hive").to_table()
    assert manifest["rows_scored"] == scored.num_rows == 1200
    assert manifest["rejects_by_reason"] == {"empty_doc": 1, "empty_query": 1}
    m = manifest["metrics"]
    assert m["stages"]["tokenize"]["rows"] == manifest["rows_read"] == 1202
    assert m["stages"]["tokenize"]["rejects"] == manifest["rejects_by_reason"]
    assert m["stages"]["score"]["rows"] == 1202
    assert m["stages"]["score"]["pairs"] == manifest["rows_scored"]
    assert m["stages"]["write"]["rows"] == 1202
    tokens = sum(scored["num_tokens"].to_pylist()) if "num_tokens" in scored.column_names else None
    if tokens is not None:
        assert m["stages"]["score"]["tokens"] == tokens
    assert m["forward_latency_ms"]["p50"] > 0 and m["forward_latency_ms"]["micro_batches"] > 0
    assert 0 < m["startup_s"]["ray_ready"] < m["startup_s"]["first_score_call_end"]
    assert m["gpu"]["status"] == "no GPU: the scoring actors ran on CPU"
    report = out / report_path(manifest["run_id"])
    assert manifest["report"] == report_path(manifest["run_id"])
    page = report.read_text()
    assert f"<td>{manifest['rows_scored']:,}</td>" in page
    assert f"<td>{manifest['pairs_per_s']:,.3g}</td>" in page or (
        f"<td>{manifest['pairs_per_s']:,.0f}</td>" in page
    )
    series = json.loads((report.parent / "metrics.json").read_text())["detail"]["throughput"]
    pairs = sum(series["pairs_per_s"]) * series["bucket_s"]
    assert pairs == pytest.approx(manifest["rows_scored"], rel=0.01)
    for png in ("outcomes", "throughput", "busy", "latency", "startup"):
        assert (report.parent / f"{png}.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.skipif(
    _chromium() is None, reason="chromium is not installed (apt-get install -y chromium)"
)
def test_report_opens_in_headless_chromium(cli_run):
    done, out, tmp = cli_run
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((out / "_SUCCESS").read_text())
    page = out / report_path(manifest["run_id"])
    # Opened alone, away from its PNG files: the page must carry its plots.
    alone = tmp / "alone" / "report.html"
    alone.parent.mkdir()
    shutil.copy(page, alone)
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        f"--user-data-dir={tmp / 'chromium-profile'}",
    ]  # fmt: skip
    script = (
        "document.body.dataset.loaded = [...document.images]"
        ".filter(i => i.complete && i.naturalWidth > 0).length"
    )
    # The DOM after load, with the count of decoded images written into it by a script.
    probe = tmp / "alone" / "probe.html"
    probe.write_text(
        alone.read_text().replace("</body>", f"<script>onload=()=>{{{script}}}</script></body>")
    )
    dom = subprocess.run(
        [_chromium(), *flags, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert f"rerank-ray run {manifest['run_id']}" in dom.stdout
    assert 'data-loaded="5"' in dom.stdout, dom.stdout[:500]
    shot = tmp / "shot.png"
    subprocess.run(
        [_chromium(), *flags, "--window-size=1000,2400", f"--screenshot={shot}", alone.as_uri()],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    from PIL import Image

    pixels = Image.open(shot).convert("L")
    low, high = pixels.getextrema()
    assert high - low > 100  # not a blank page
