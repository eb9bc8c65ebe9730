"""Training-data exports built from labeled rows (``labeling.label_queries`` output, or the
same rows read back from a run's committed Parquet, in any order).

- FlagEmbedding fine-tuning JSONL, one line per query that has a positive and a hard
  negative: ``{"query", "pos", "neg", "pos_scores", "neg_scores"}``. Field names and types as
  FlagEmbedding's loaders read them (``FlagEmbedding/abc/finetune/reranker/AbsDataset.py`` and
  ``FlagEmbedding/abc/finetune/embedder/AbsDataset.py``, ``__getitem__``: ``data['pos']`` and
  ``data['neg']`` must be lists, a positive is drawn with ``random.choice`` and negatives are
  sampled from ``len(data['neg'])`` — so both must be non-empty — and with
  ``knowledge_distillation`` every ``pos_scores``/``neg_scores`` entry must be an int/float).
  No other keys: ``datasets.concatenate_datasets`` there needs the same columns in every file.
- sentence-transformers Parquet: ``(query, positive, negative)`` triplets (each exported
  positive with each hard negative) and ``(query, passage, score)`` distillation rows for every
  scored candidate. Only those columns: sentence-transformers feeds every non-label column to
  the loss, and takes a column named ``score`` (or ``label``) as the label.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rerank_ray import schema
from rerank_ray.modes.config import LabelConfig
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


def sentence_transformers_triplets(labeled: pa.Table, cfg: LabelConfig) -> pa.Table:
    """``(query, positive, negative)`` rows: every exported positive with every hard negative."""
    rows: dict[str, list[str]] = {"query": [], "positive": [], "negative": []}
    for _, group in _query_groups(labeled, cfg.teacher_score):
        negatives = group.loc[group[HARD_NEGATIVE], schema.DOC].tolist()
        for positive in _positives(group, cfg)[schema.DOC]:
            for negative in negatives:
                rows["query"].append(group[schema.QUERY].iloc[0])
                rows["positive"].append(positive)
                rows["negative"].append(negative)
    return pa.table(rows, schema=TRIPLET_SCHEMA)


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
