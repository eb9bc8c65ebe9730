"""The job's configuration: one typed, frozen, validated object, from YAML and/or flags.

Each field carries its help text (``metadata["help"]``); the CLI builds its flags from the
fields, so a field added here is a flag and a YAML key at once. How a mapping (YAML, flags)
becomes a config is ``typed_config``'s.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rerank_ray.runners import DEVICES, DTYPES, PRECISIONS, check_precision
from rerank_ray.typed_config import ConfigError, check_choice, coerce_value, from_mapping

DEFAULT_MODEL = "BAAI/bge-reranker-v2-m3"
INPUT_FORMATS = ("auto", "parquet", "jsonl")
LONG_DOCS = ("truncate", "chunk")
CHUNK_AGGREGATES = ("max", "first", "mean")
# Special tokens around a pair that the config-time checks allow for (XLM-R's <s> q </s></s>
# d </s> has 4); the tokenize stage checks the model's own count.
PAIR_SPECIAL_TOKENS = 4


def _f(default: Any = dataclasses.MISSING, help: str = "", **kw: Any) -> Any:  # noqa: A002
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass(frozen=True)
class JobConfig:
    """Everything a rerank run needs. Build it with ``JobConfig(...)``, ``from_dict`` or
    ``from_yaml``; it is validated when built and cannot change afterwards."""

    # --- source ---------------------------------------------------------------------------
    input: str = _f(help="Input shards: s3://bucket/prefix/, a local directory, file or glob.")
    output: str = _f(help="Output root: s3://bucket/prefix/ or a local directory.")
    input_format: str = _f("auto", help="parquet, jsonl, or auto (from file extensions).")
    query_id_column: str = _f("query_id", help="Input column holding the query id.")
    query_column: str = _f("query", help="Input column holding the query text.")
    doc_id_column: str = _f("doc_id", help="Input column holding the document id.")
    doc_column: str = _f("doc", help="Input column holding the document text.")
    keep_columns: list[str] | None = _f(
        None, help="Input columns written to the output (ids always kept); default all."
    )
    # --- storage --------------------------------------------------------------------------
    s3_endpoint_url: str | None = _f(
        None, help="S3-compatible endpoint URL; default AWS_ENDPOINT_URL[_S3] or AWS itself."
    )
    s3_region: str | None = _f(None, help="S3 region; default from the AWS chain.")
    s3_verify_tls: bool = _f(
        True, help="Verify TLS certificates of the S3 endpoint (turn off only for local tests)."
    )
    # --- model ----------------------------------------------------------------------------
    model: str = _f(DEFAULT_MODEL, help="Hugging Face hub id, local directory or s3:// prefix.")
    revision: str | None = _f(None, help="Hub revision (branch, tag or commit) of the model.")
    model_cache_dir: str | None = _f(
        None, help="Where s3:// models are downloaded on each node; default ~/.cache/rerank-ray."
    )
    dtype: str = _f("auto", help="float16, bfloat16, float32, or auto (fp16 on GPU, fp32 on CPU).")
    max_length: int = _f(512, help="Max tokens of a (query, doc) pair, special tokens included.")
    query_max_length: int | None = _f(
        None, help="Max tokens of the query alone; default 3/4 of max_length (as FlagReranker)."
    )
    allow_pickle_weights: bool = _f(
        False, help="Allow loading pickle (.bin) weights when no safetensors exist. Unsafe."
    )
    trust_remote_code: bool = _f(False, help="Run model code from the model repository. Unsafe.")
    fast_gelu: bool = _f(
        False,
        help="GPU only: fuse a tanh-approximated GELU into the feed-forward matmul: faster, "
        "but logits move slightly from the exact GELU (README: Precision).",
    )
    fused_kernels: bool = _f(
        True,
        help="GPU: Triton kernels for each residual add + LayerNorm and (fp16/bf16) the "
        "variable-length attention and the exact GELU (same numerics as PyTorch's ops, the "
        "GELU within one fp16 ulp); checked at actor start, PyTorch's ops if the check fails.",
    )
    long_docs: str = _f(
        "truncate",
        help="Documents longer than a pair's room: truncate (cut and flag, as FlagReranker) or "
        "chunk (score overlapping windows, one row per pair; README: Long documents).",
    )
    chunk_overlap: int = _f(64, help="chunk: tokens each window shares with the one before.")
    max_chunks_per_doc: int = _f(
        8, help="chunk: most windows per document; text past them is flagged truncated."
    )
    chunk_aggregate: str = _f(
        "max", help="chunk: a pair's score from its windows' scores: max, first or mean."
    )
    precision: str = _f(
        "auto",
        help="auto (dtype decides), int8 (CPU: ONNX Runtime INT8, the [cpu] extra), or fp8 "
        "(FP8 matmuls on Ada or Hopper GPUs); never chosen silently (README: Precision).",
    )
    # --- scale ----------------------------------------------------------------------------
    device: str = _f("auto", help="cuda, cpu, or auto (cuda when the cluster has GPUs).")
    num_actors: int | None = _f(
        None, help="Fixed scoring pool size; default: GPUs in the cluster (1 on CPU)."
    )
    min_actors: int | None = _f(None, help="Autoscaling pool minimum (with max_actors).")
    max_actors: int | None = _f(None, help="Autoscaling pool maximum (with min_actors).")
    tokenize_actors: int | None = _f(
        None,
        help="Tokenizer actors (CPU, 1 core each) feeding the scoring pool; default: "
        "autoscaling with demand between 1 per scoring actor and the CPUs the cluster has "
        "left (docs/cluster.md: Size the pools to the GPUs).",
    )
    batch_rows: int | None = _f(
        None,
        help="Rows per block handed to each stage; default: 2048, or larger blocks (up to "
        "8192) when an earlier run of this model measured a fast scoring actor "
        "(docs/cluster.md).",
    )
    scorer_calls: int = _f(
        2,
        help="GPU: blocks each scoring actor works on at once, so the next block is fetched "
        "and prepared while this one's forward passes run; 1 = one block at a time.",
    )
    token_budget: int | None = _f(
        None, help="Max tokens (padded) per forward pass; default: autotuned on GPU, 8192 on CPU."
    )
    # --- sink -----------------------------------------------------------------------------
    partition_by: list[str] = _f(
        ["run_date"], help="Hive partition columns of the output (run_date = the run's date)."
    )
    run_date: str | None = _f(
        None, help="Value of the run_date partition (YYYY-MM-DD); default today (UTC)."
    )
    run_id: str | None = _f(None, help="Run id, part of every output file name; default generated.")
    rows_per_file: int = _f(
        200_000,
        help="Rows a write task buffers per output file; also what a killed run may redo.",
    )

    # ---------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        for key in ("input", "output"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"`{key}` is required: pass --{key} URI or set `{key}:` in YAML.")
        check_choice("input_format", self.input_format, INPUT_FORMATS)
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("device", self.device, DEVICES)
        check_choice("precision", self.precision, PRECISIONS)
        check_precision(self.precision, self.dtype)
        if self.max_length < 8:
            raise ConfigError(f"`max_length` is {self.max_length}; it must be at least 8.")
        if self.query_max_length is not None and not (
            1 <= self.query_max_length <= self.max_length - 4
        ):
            raise ConfigError(
                f"`query_max_length` is {self.query_max_length}; it must be between 1 and "
                f"max_length - 4 ({self.max_length - 4}) so the document keeps some tokens."
            )
        self._check_long_docs()
        for key in ("num_actors", "min_actors", "max_actors", "token_budget"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"`{key}` is {value}; it must be a positive integer.")
        if self.num_actors is not None and (self.min_actors or self.max_actors):
            raise ConfigError(
                "Set either `num_actors` (fixed pool) or `min_actors`/`max_actors` (autoscaling), "
                "not both."
            )
        if (self.min_actors is None) != (self.max_actors is None):
            raise ConfigError("`min_actors` and `max_actors` go together: set both.")
        if self.min_actors is not None and self.min_actors > self.max_actors:
            raise ConfigError(
                f"`min_actors` ({self.min_actors}) is larger than `max_actors` ({self.max_actors})."
            )
        counts = ("tokenize_actors", "batch_rows", "rows_per_file", "scorer_calls")
        if bad := [
            f"`{n}` is {v}" for n in counts if (v := getattr(self, n)) is not None and v < 1
        ]:
            raise ConfigError(
                f"{', '.join(bad)}: `tokenize_actors`, `batch_rows`, `rows_per_file` and "
                "`scorer_calls` must be positive integers (--tokenize-actors, --batch-rows, "
                "--rows-per-file, --scorer-calls)."
            )
        if self.token_budget is not None and self.token_budget < self.max_length:
            raise ConfigError(
                f"`token_budget` ({self.token_budget}) is below `max_length` ({self.max_length}): "
                "one full-length pair must fit in a forward pass. Pass --token-budget "
                f"{self.max_length} or more, or --max-length {self.token_budget} or less."
            )
        if self.run_date is not None:
            try:
                _dt.date.fromisoformat(self.run_date)
            except ValueError:
                raise ConfigError(
                    f"`run_date` is {self.run_date!r}; use the YYYY-MM-DD form, e.g. 2026-11-21."
                ) from None
        if self.run_id is not None and not _is_safe_id(self.run_id):
            raise ConfigError(
                f"`run_id` is {self.run_id!r}; use letters, digits, '-' and '_' only "
                "(it becomes part of file names)."
            )
        cols = [self.query_id_column, self.query_column, self.doc_id_column, self.doc_column]
        if len(set(cols)) != 4:
            raise ConfigError(f"The four column names must differ; got {cols}.")

    def _check_long_docs(self) -> None:
        check_choice("long_docs", self.long_docs, LONG_DOCS)
        check_choice("chunk_aggregate", self.chunk_aggregate, CHUNK_AGGREGATES)
        if self.max_chunks_per_doc < 1:
            raise ConfigError(
                f"`max_chunks_per_doc` is {self.max_chunks_per_doc}; it must be at least 1."
            )
        if self.chunk_overlap < 0:
            raise ConfigError(f"`chunk_overlap` is {self.chunk_overlap}; it must be 0 or more.")
        window = self.min_doc_window
        if self.long_docs == "chunk" and self.chunk_overlap >= window:
            raise ConfigError(
                f"`chunk_overlap` ({self.chunk_overlap}) must be smaller than the shortest "
                f"document window, {window} tokens (max_length {self.max_length} - "
                f"query_max_length {self.effective_query_max_length} - "
                f"{PAIR_SPECIAL_TOKENS} special tokens), or windows would not advance. "
                + (f"Pass --chunk-overlap {window // 4}, or raise" if window > 0 else "Raise")
                + " --max-length or lower --query-max-length."
            )

    # ---------------------------------------------------------------------------------------
    @property
    def min_doc_window(self) -> int:
        """Document tokens a pair keeps when its query takes all of ``query_max_length``
        (assuming ``PAIR_SPECIAL_TOKENS`` special tokens): the shortest chunk window."""
        return self.max_length - self.effective_query_max_length - PAIR_SPECIAL_TOKENS

    @property
    def effective_query_max_length(self) -> int:
        """Query token limit: the configured one, else 3/4 of ``max_length`` (FlagReranker's)."""
        if self.query_max_length is not None:
            return self.query_max_length
        return self.max_length * 3 // 4

    @property
    def effective_run_date(self) -> str:
        """The run date partition value."""
        return self.run_date or _dt.datetime.now(_dt.timezone.utc).date().isoformat()

    @property
    def column_map(self) -> dict[str, str]:
        """Input column name -> canonical name."""
        return {
            self.query_id_column: "query_id",
            self.query_column: "query",
            self.doc_id_column: "doc_id",
            self.doc_column: "doc",
        }

    def with_defaults_resolved(self) -> JobConfig:
        """A copy with the run id, run date and S3 endpoint/region fixed, so every worker sees
        the same values (idempotent: resolving twice gives the same config)."""
        from rerank_ray.storage import S3Settings

        # The endpoint and region resolved here (flags, else this machine's
        # AWS_ENDPOINT_URL(_S3) and AWS_REGION) go to every worker in the config: the workers
        # of a cluster the job joins do not see the driver's environment. They are not
        # secrets (credentials never enter the config), and the manifest records them.
        s3 = S3Settings.resolve(self.s3_endpoint_url, self.s3_region, self.s3_verify_tls)
        return dataclasses.replace(
            self,
            run_id=self.run_id or new_run_id(),
            run_date=self.effective_run_date,
            s3_endpoint_url=s3.endpoint_url,
            s3_region=s3.region,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (for the manifest and for logging)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> JobConfig:
        """Build from a mapping; an unknown key is an error naming the closest valid key."""
        return from_mapping(cls, data, source, coerce_value)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Mapping[str, Any] | None = None) -> JobConfig:
        """Load a YAML file; ``overrides`` (e.g. from flags) win over the file's values."""
        text = Path(path).read_text()
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a YAML mapping of keys to values.")
        merged = {str(k).replace("-", "_"): v for k, v in data.items()}
        merged.update(overrides or {})
        return cls.from_dict(merged, source=str(path))


def new_run_id() -> str:
    """A sortable, unique run id: UTC timestamp plus a random suffix."""
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{now}-{uuid.uuid4().hex[:8]}"


def _is_safe_id(value: str) -> bool:
    return bool(value) and all(c.isalnum() or c in "-_" for c in value)
