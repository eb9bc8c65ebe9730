"""Training-data exports built from labeled rows (``groups.labeling_group`` output: one
block of whole queries of a run, or more, in any order).

- FlagEmbedding fine-tuning JSONL, one line per query that has a positive and a hard
  negative: ``{"query", "pos", "neg", "pos_scores", "neg_scores"}``. Field names and types as
  FlagEmbedding's loaders read them (``FlagEmbedding/abc/finetune/reranker/AbsDataset.py`` and
  ``FlagEmbedding/abc/finetune/embedder/AbsDataset.py``, ``__getitem__``: ``data['pos']`` and
  ``data['neg']`` must be lists, a positive is drawn with ``random.choice`` and negatives are
  sampled from ``len(data['neg'])`` — so both must be non-empty — and with
  ``knowledge_distillation`` every ``pos_scores``/``neg_scores`` entry must be an int/float).
  No other keys: ``datasets.concatenate_datasets`` there needs the same columns in every file.
- sentence-transformers hard negatives in the format ``hard_negative_format`` names, with the
  columns ``sentence_transformers.util.mine_hard_negatives`` (v5) writes for a dataset whose
  anchor column is ``query`` and positive column ``positive``:

  - ``triplet``: ``(query, positive, negative)``, each positive with each hard negative;
  - ``n-tuple``: ``(query, positive, negative_1, ..., negative_n)``, one row per positive of
    a query with exactly ``n = max_hard_negatives`` hard negatives (others are left out, as
    there); ``n-tuple-scores`` adds ``score``: [positive score, negative scores...];
  - ``labeled-pair``: ``(query, positive, label)``, every positive of a query with label 1
    and each of its hard negatives with label 0 (the column holds both, as there);
  - ``labeled-list``: ``(query, positive, labels)``, per positive of a query with a hard
    negative: [positive, hard negatives...] and [1, 0, ...].

- ``(query, passage, score)`` distillation rows for every scored candidate. Only those
  columns: sentence-transformers feeds every non-label column to the loss, and takes a column
  named ``score`` (or ``label``) as the label.

Scores are ``teacher_score``. Every builder works on any set of whole queries, so a run
builds each export per block of queries and writes one shard per block.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rerank_ray import schema
from rerank_ray.modes.config import HARD_NEGATIVE_FORMATS, LabelConfig
from rerank_ray.modes.labeling import HARD_NEGATIVE, LABEL, POS
from rerank_ray.modes.ranking import RANK, split_rejected

FLAGEMBEDDING_KEYS = ("query", "pos", "neg", "pos_scores", "neg_scores")
TRIPLET_SCHEMA = pa.schema(
    [
        pa.field("query", pa.string()),
        pa.field("positive", pa.string()),
        pa.field("negative", pa.string()),
    ]
)
DISTILLATION_SCHEMA = pa.schema(
    [
        pa.field("query", pa.string()),
        pa.field("passage", pa.string()),
        pa.field("score", pa.float32()),
    ]
)


def flagembedding_records(labeled: pa.Table, cfg: LabelConfig) -> Iterator[dict]:
    """One FlagEmbedding training record per query with a positive and a hard negative, in
    query_id order; lists in rank order; scores from ``cfg.teacher_score``."""
    for _, group in _query_groups(labeled, cfg.teacher_score):
        pos = _positives(group, cfg)
        neg = group[group[HARD_NEGATIVE]]
        if pos.empty or neg.empty:
            continue
        yield {
            "query": group[schema.QUERY].iloc[0],
            "pos": pos[schema.DOC].tolist(),
            "neg": neg[schema.DOC].tolist(),
            "pos_scores": [float(s) for s in pos["_teacher"]],
            "neg_scores": [float(s) for s in neg["_teacher"]],
        }


# File stem of each format's shards (``sentence_transformers/<stem>-00000.parquet``).
HARD_NEGATIVE_STEMS = dict(
    zip(
        HARD_NEGATIVE_FORMATS,
        ("triplets", "n-tuples", "n-tuples-scores", "labeled-pairs", "labeled-lists"),
        strict=True,
    )
)


def hard_negative_schema(cfg: LabelConfig) -> pa.Schema:
    """The Arrow schema of ``cfg.hard_negative_format``'s rows."""
    fmt, text = cfg.hard_negative_format, pa.string()
    if fmt == "triplet":
        return TRIPLET_SCHEMA
    if fmt in ("n-tuple", "n-tuple-scores"):
        negatives = [(f"negative_{i}", text) for i in range(1, cfg.max_hard_negatives + 1)]
        scores = [("score", pa.list_(pa.float32()))] if fmt == "n-tuple-scores" else []
        return pa.schema([("query", text), ("positive", text), *negatives, *scores])
    if fmt == "labeled-pair":
        return pa.schema([("query", text), ("positive", text), ("label", pa.int64())])
    return pa.schema(
        [("query", text), ("positive", pa.list_(text)), ("labels", pa.list_(pa.int64()))]
    )


def hard_negative_rows(labeled: pa.Table, cfg: LabelConfig) -> pa.Table:
    """The sentence-transformers hard-negative rows of ``cfg.hard_negative_format`` (see the
    module docstring), in (query_id, rank) order."""
    fmt = cfg.hard_negative_format
    target = hard_negative_schema(cfg)
    rows: dict[str, list] = {name: [] for name in target.names}

    def add(**values) -> None:
        for name, value in values.items():
            rows[name].append(value)

    for _, group in _query_groups(labeled, cfg.teacher_score):
        query = group[schema.QUERY].iloc[0]
        pos = _positives(group, cfg)
        neg = group[group[HARD_NEGATIVE]]
        negatives, neg_scores = neg[schema.DOC].tolist(), [float(s) for s in neg["_teacher"]]
        if fmt == "labeled-pair":
            for doc in pos[schema.DOC]:
                add(query=query, positive=doc, label=1)
            if len(pos):
                for doc in negatives:
                    add(query=query, positive=doc, label=0)
            continue
        if not negatives:
            continue
        for doc, score in zip(pos[schema.DOC], pos["_teacher"], strict=True):
            if fmt == "triplet":
                for negative in negatives:
                    add(query=query, positive=doc, negative=negative)
            elif fmt == "labeled-list":
                add(query=query, positive=[doc, *negatives], labels=[1] + [0] * len(negatives))
            elif len(negatives) == cfg.max_hard_negatives:
                add(query=query, positive=doc)
                add(**{f"negative_{i}": n for i, n in enumerate(negatives, start=1)})
                if fmt == "n-tuple-scores":
                    add(score=[float(score), *neg_scores])
    return pa.table(rows, schema=target)


def sentence_transformers_distillation(labeled: pa.Table, cfg: LabelConfig) -> pa.Table:
    """``(query, passage, score)`` for every scored candidate, in (query_id, rank) order."""
    frame = _scored_frame(labeled, cfg.teacher_score)
    return pa.table(
        {
            "query": frame[schema.QUERY].tolist(),
            "passage": frame[schema.DOC].tolist(),
            "score": frame["_teacher"].to_numpy(dtype="float32"),
        },
        schema=DISTILLATION_SCHEMA,
    )


def write_jsonl(
    records: Iterator[dict], path: str, filesystem: pafs.FileSystem | None = None
) -> int:
    """Write records as UTF-8 JSON lines (via ``filesystem``, local when None); returns the count."""
    filesystem = filesystem or pafs.LocalFileSystem()
    count = 0
    with filesystem.open_output_stream(path) as out:
        for record in records:
            out.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
            count += 1
    return count


def write_parquet(table: pa.Table, path: str, filesystem: pafs.FileSystem | None = None) -> None:
    """Write one Parquet file with the table's explicit schema."""
    pq.write_table(table, path, filesystem=filesystem or pafs.LocalFileSystem())


# --- helpers ----------------------------------------------------------------------------------
def _scored_frame(labeled: pa.Table, teacher: str) -> pd.DataFrame:
    """Scored rows' export columns as a DataFrame sorted by (query_id, rank)."""
    scored, _ = split_rejected(labeled)
    names = [schema.QUERY_ID, schema.QUERY, schema.DOC, RANK, LABEL, HARD_NEGATIVE]
    frame = scored.select(names).to_pandas()
    frame["_teacher"] = scored[teacher].to_numpy()
    return frame.sort_values([schema.QUERY_ID, RANK], kind="stable")


def _query_groups(labeled: pa.Table, teacher: str):
    return _scored_frame(labeled, teacher).groupby(schema.QUERY_ID, sort=True)


def _positives(group: pd.DataFrame, cfg: LabelConfig) -> pd.DataFrame:
    pos = group[group[LABEL] == POS]
    return pos if cfg.max_positives is None else pos.head(cfg.max_positives)
