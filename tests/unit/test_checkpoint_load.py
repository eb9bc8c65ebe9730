"""PackedEncoder.from_checkpoint: the encoder read straight from config.json and safetensors
(no transformers) holds the same weights as one built from the HF model, and says None,
so the caller goes through transformers, wherever the directory is not plainly readable."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification

from rerank_ray.runners.encoder import PackedEncoder

rng = np.random.default_rng(0)
LENGTHS = [3, 17, 1, 40, 9]
OFFSETS = np.concatenate(([0], np.cumsum(LENGTHS)))


def _inputs(with_types: bool):
    ids = rng.integers(5, 200, OFFSETS[-1]).astype(np.int32)
    ids[OFFSETS[:-1]] = 0
    types = (rng.random(OFFSETS[-1]) < 0.5).astype(np.int8) if with_types else None
    return ids, OFFSETS, types


@pytest.mark.parametrize("kind", ["tiny_model_dir", "tiny_bert_dir"])
def test_checkpoint_encoder_equals_the_one_built_from_the_hf_model(kind, request):
    model_dir = request.getfixturevalue(kind)
    hf = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    args = _inputs(with_types=kind == "tiny_bert_dir")
    direct = PackedEncoder.from_checkpoint(
        model_dir, device="cpu", dtype=torch.float32, attention="sdpa"
    )
    assert direct is not None
    np.testing.assert_array_equal(direct.score(*args), PackedEncoder(hf).score(*args))
    half = PackedEncoder.from_checkpoint(model_dir, device="cpu", dtype=torch.bfloat16)
    assert half._word.dtype == torch.bfloat16 and half.max_tokens == direct.max_tokens


def test_sharded_checkpoint_reads_every_shard(tiny_model_dir, tmp_path):
    hf = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir).eval()
    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_model_dir, sharded)
    (sharded / "model.safetensors").unlink()
    hf.save_pretrained(sharded, max_shard_size="100KB")
    shards = list(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1 and (sharded / "model.safetensors.index.json").is_file()
    args = _inputs(with_types=False)
    direct = PackedEncoder.from_checkpoint(sharded, device="cpu", dtype=torch.float32)
    assert direct is not None
    np.testing.assert_array_equal(direct.score(*args), PackedEncoder(hf).score(*args))


def _edit_config(model_dir, **changes):
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "change",
    [
        {"layer_norm_eps": None},  # a setting left to the library's default
        {"architectures": None},
        {"architectures": ["XLMRobertaModel"]},
        {"auto_map": {"AutoModelForSequenceClassification": "custom.Model"}},
        {"id2label": {"0": "a", "1": "b"}},  # two labels: not a reranker
        {"position_embedding_type": "relative_key"},
        {"pad_token_id": None},
    ],
)
def test_not_plainly_readable_configs_go_through_transformers(model_copy, change):
    _edit_config(model_copy, **change)
    assert PackedEncoder.from_checkpoint(model_copy, device="cpu", dtype=torch.float32) is None


def test_missing_tensor_or_pickle_only_weights_go_through_transformers(model_copy, tmp_path):
    weights = model_copy / "model.safetensors"
    state = load_file(weights)
    state.pop("classifier.out_proj.bias")
    save_file(state, weights, metadata={"format": "pt"})
    assert PackedEncoder.from_checkpoint(model_copy, device="cpu", dtype=torch.float32) is None
    weights.unlink()
    torch.save(state, model_copy / "pytorch_model.bin")
    assert PackedEncoder.from_checkpoint(model_copy, device="cpu", dtype=torch.float32) is None


def test_reading_the_checkpoint_imports_no_transformers(tiny_model_dir):
    """What the path is for: the scoring actor's start without importing transformers."""
    code = (
        "import sys, torch\n"
        "from rerank_ray.runners.encoder import PackedEncoder\n"
        f"e = PackedEncoder.from_checkpoint({str(tiny_model_dir)!r}, device='cpu',"
        " dtype=torch.float32)\n"
        "assert e is not None\n"
        "print('transformers' in sys.modules)\n"
    )
    assert _printed_by(code) == "False"


def test_the_runners_import_without_ray_and_run_still_resolves():
    """The scoring modules load on a machine without Ray (``rerank_ray.run`` is imported on
    first use), and ``rerank_ray.run`` is still the pipeline's entrypoint."""
    code = (
        "import sys\n"
        "import rerank_ray.runners.fp8, rerank_ray.runners.padded, rerank_ray.runners.packed\n"
        "print('ray' in sys.modules)\n"
        "import rerank_ray, rerank_ray.pipeline\n"
        "assert rerank_ray.run is rerank_ray.pipeline.run\n"
    )
    assert _printed_by(code) == "False"


def _printed_by(code: str) -> str:
    """What ``code`` prints, run in a fresh interpreter (which must exit cleanly)."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()
