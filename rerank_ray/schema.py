"""Column names, Arrow schemas and reject reason codes: the contract between stages.

Every stage reads and writes these names, so a rename happens in one place. Input columns
are renamed to the canonical names below as they are read (see ``source.py``).
"""

from __future__ import annotations

import pyarrow as pa

# Canonical input columns.
QUERY_ID = "query_id"
QUERY = "query"
DOC_ID = "doc_id"
DOC = "doc"
REQUIRED_COLUMNS = (QUERY_ID, QUERY, DOC_ID, DOC)
TEXT_COLUMNS = (QUERY, DOC)

# Columns the tokenize stage adds and the score stage consumes.
INPUT_IDS = "input_ids"
TOKEN_TYPE_IDS = "token_type_ids"
NUM_TOKENS = "num_tokens"
REJECT_REASON = "reject_reason"
TOKEN_COLUMNS = (INPUT_IDS, TOKEN_TYPE_IDS, NUM_TOKENS)

# Output columns added by the job.
SCORE = "score"
SCORE_NORM = "score_norm"
TRUNCATED = "truncated"
OUTPUT_COLUMNS = (SCORE, SCORE_NORM, TRUNCATED)
# Added after those with ``long_docs: chunk`` only: how many windows a pair's document was
# scored in, and the (0-based) window with the highest score.
NUM_CHUNKS = "num_chunks"
BEST_CHUNK = "best_chunk"
CHUNK_COLUMNS = (NUM_CHUNKS, BEST_CHUNK)

# Default partition column; its value is the run date (YYYY-MM-DD).
RUN_DATE = "run_date"

# Directory (under the output) for rejected rows, and the commit marker.
REJECTS_DIR = "_rejects"
MANIFEST_NAME = "_SUCCESS"


class RejectReason:
    """Reason codes for rows that cannot be scored. Stored in the ``reject_reason`` column."""

    NULL_QUERY = "null_query"
    NULL_DOC = "null_doc"
    EMPTY_QUERY = "empty_query"
    EMPTY_DOC = "empty_doc"
    NOT_STRING_QUERY = "not_string_query"
    NOT_STRING_DOC = "not_string_doc"
    NULL_ID = "null_id"
    # Set by job modes: rows a mode leaves out on purpose.
    DUPLICATE_PAIR = "duplicate_pair"
    BELOW_TOP_K = "below_top_k"

    ALL = (
        NULL_QUERY,
        NULL_DOC,
        EMPTY_QUERY,
        EMPTY_DOC,
        NOT_STRING_QUERY,
        NOT_STRING_DOC,
        NULL_ID,
        DUPLICATE_PAIR,
        BELOW_TOP_K,
    )


def token_schema_fields(with_token_type_ids: bool, chunked: bool = False) -> list[pa.Field]:
    """Arrow fields the tokenize stage appends. Token ids travel as compact int32 lists; with
    ``chunked`` (``long_docs: chunk``) a row's ids are a list of windows, each a whole pair."""

    def tokens(value_type: pa.DataType) -> pa.DataType:
        return pa.list_(pa.list_(value_type)) if chunked else pa.list_(value_type)

    fields = [
        pa.field(INPUT_IDS, tokens(pa.int32())),
        pa.field(NUM_TOKENS, pa.int32()),
        pa.field(TRUNCATED, pa.bool_()),
        pa.field(REJECT_REASON, pa.string()),
    ]
    if with_token_type_ids:
        fields.insert(1, pa.field(TOKEN_TYPE_IDS, tokens(pa.int8())))
    return fields


SCORE_FIELDS = (
    pa.field(SCORE, pa.float32()),
    pa.field(SCORE_NORM, pa.float32()),
)
CHUNK_FIELDS = (
    pa.field(NUM_CHUNKS, pa.int32()),
    pa.field(BEST_CHUNK, pa.int32()),
)


def scored_schema(passthrough: pa.Schema, chunked: bool = False) -> pa.Schema:
    """Schema of scored output rows: passthrough columns, then score, score_norm, truncated,
    and with ``chunked`` (``long_docs: chunk``) num_chunks and best_chunk."""
    own = (*OUTPUT_COLUMNS, REJECT_REASON, *(CHUNK_COLUMNS if chunked else ()))
    fields = [f for f in passthrough if f.name not in own]
    chunk_fields = CHUNK_FIELDS if chunked else ()
    return pa.schema([*fields, *SCORE_FIELDS, pa.field(TRUNCATED, pa.bool_()), *chunk_fields])


def rejects_schema(passthrough: pa.Schema) -> pa.Schema:
    """Schema of rejected rows: passthrough columns, then ``reject_reason``."""
    fields = [f for f in passthrough if f.name not in OUTPUT_COLUMNS and f.name != REJECT_REASON]
    return pa.schema([*fields, pa.field(REJECT_REASON, pa.string())])
