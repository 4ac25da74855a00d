"""Output column names, row statuses and the pyarrow schemas of OUTPUT/scores and OUTPUT/flagged.

The single source of truth for the audit's output contract. Imports pyarrow only.
"""

from __future__ import annotations

import pyarrow as pa

# The audit summary next to the results (what `auditor report` and `auditor filter` read).
AUDIT_FILE = "_audit.json"

# Columns of OUTPUT/scores (in this order, then the --keep-columns).
ID = "id"
CAPTION = "caption"
SCORE = "score"
# The second stage's score (auditor.scoring.cascade): null unless the row's score was over the screening threshold.
CONFIRM_SCORE = "confirm_score"
FLAGGED = "flagged"
SOURCE = "source"
ROW = "row"
N_TOKENS = "n_tokens"
TRUNCATED = "truncated"
STATUS = "status"
ERROR = "error"
# Added to OUTPUT/flagged with --explain-flagged.
TOKENS = "tokens"
TOKEN_SIGNIFICANCE = "token_significance"
# Hive partition column: one value per input file (see auditor.io.inputs.shard_key), so every input file owns
# exactly one folder scores/shard=<key>/ and a rerun of that file replaces it whole.
SHARD = "shard"
# Added by `auditor filter --mode mark` and by `auditor.ray_data.add_memorization_scores` (which adds the status too).
MEMORIZATION_FLAG = "memorization_flag"
MEMORIZATION_SCORE = "memorization_score"
MEMORIZATION_STATUS = "memorization_status"
MEMORIZATION_CONFIRM_SCORE = "memorization_confirm_score"  # only with the second stage on

# Schema metadata key on the score actor's output batches: its Scorer.runtime as JSON (for _audit.json).
ACTOR_RUNTIME_KEY = b"auditor.actor_runtime"
# Internal columns that travel between pipeline stages and are never written.
INPUT_IDS = "_input_ids"
ATTENTION_MASK = "_attention_mask"
# The work unit of every row (int32), and on a unit's END_OF_UNIT row: its row count (int64) and the number of
# units of its file (int32); null on other rows.
UNIT = "_unit"
UNIT_ROWS = "_unit_rows"
FILE_UNITS = "_file_units"
# The Ray node that scored a row (set by the score actor; the write stage counts it into its acknowledgement and
# drops it when staging rows, INTERNAL_COLUMNS below): per-node throughput in _audit.json only.
NODE = "_node"
# Denoiser rows the score actor ran for a row, per stage (identical captions are run once: the first carries it);
# the write stage sums them into its acknowledgement's counts (DENOISER_ROWS_COUNT) and drops them.
DENOISER_ROWS = {"screen": "_denoiser_rows_screen", "confirm": "_denoiser_rows_confirm"}
DENOISER_ROWS_COUNT = {"screen": "denoiser_rows_screen", "confirm": "denoiser_rows_confirm"}
# Counts key of rows that got a confirm score.
RESCORED_COUNT = "rescored"
UNIT_FIELDS = (
    pa.field(UNIT, pa.int32()),
    pa.field(UNIT_ROWS, pa.int64()),
    pa.field(FILE_UNITS, pa.int32()),
)
# Every internal column: dropped when rows are staged, so none reaches a file (nor can be a --keep-columns name).
INTERNAL_COLUMNS = frozenset(
    {INPUT_IDS, ATTENTION_MASK, NODE, *DENOISER_ROWS.values(), *(f.name for f in UNIT_FIELDS)}
)

# Row statuses. Everything but OK has a null score and flagged = False.
OK = "ok"
NULL_CAPTION = "null_caption"
NOT_STRING = "not_string"
EMPTY_CAPTION = "empty_caption"
BAD_RECORD = "bad_record"  # a jsonl line that is not a JSON object
SCORE_ERROR = "score_error"  # the scorer raised on the batch holding this row
ROW_STATUSES = (OK, NULL_CAPTION, NOT_STRING, EMPTY_CAPTION, BAD_RECORD, SCORE_ERROR)
# Control rows the reader emits once per work unit; the write stage turns them into acknowledgements and never
# writes them. END_OF_UNIT: `row` is the unit's first row, UNIT_ROWS its row count, FILE_UNITS the file's unit
# count. READ_ERROR: the unit failed; `error` says why.
END_OF_UNIT = "_end_of_unit"
READ_ERROR = "_read_error"
CONTROL_STATUSES = (END_OF_UNIT, READ_ERROR)

SCORES_SCHEMA = pa.schema(
    [
        pa.field(ID, pa.string(), nullable=False),
        pa.field(CAPTION, pa.string()),
        pa.field(SCORE, pa.float32()),
        pa.field(CONFIRM_SCORE, pa.float32()),
        pa.field(FLAGGED, pa.bool_(), nullable=False),
        pa.field(SOURCE, pa.string(), nullable=False),
        pa.field(ROW, pa.int64(), nullable=False),
        pa.field(N_TOKENS, pa.int32()),
        pa.field(TRUNCATED, pa.bool_()),
        pa.field(STATUS, pa.string(), nullable=False),
        pa.field(ERROR, pa.string()),
    ]
)
FLAGGED_COLUMNS = (ID, CAPTION, SCORE, CONFIRM_SCORE, SOURCE, ROW)
# Columns that only OUTPUT/flagged carries (never a keep-column of OUTPUT/scores).
FLAGGED_SCHEMA_EXTRA = (TOKENS, TOKEN_SIGNIFICANCE)
EXPLAIN_FIELDS = (
    pa.field(TOKENS, pa.list_(pa.string())),
    pa.field(TOKEN_SIGNIFICANCE, pa.list_(pa.float32())),
)

# What the reader stage emits per row (before tokenize and score), then the keep-columns.
READ_SCHEMA = pa.schema(
    [
        pa.field(ID, pa.string()),
        pa.field(CAPTION, pa.string()),
        pa.field(SOURCE, pa.string()),
        pa.field(ROW, pa.int64()),
        pa.field(STATUS, pa.string()),
        pa.field(ERROR, pa.string()),
    ]
)


def scores_schema(keep_fields: list[pa.Field] | tuple[pa.Field, ...] = ()) -> pa.Schema:
    """OUTPUT/scores file schema: the fixed columns, then the --keep-columns with their input types."""
    return pa.schema([*SCORES_SCHEMA, *keep_fields])


def flagged_schema(explain: bool = False) -> pa.Schema:
    fields = [SCORES_SCHEMA.field(name) for name in FLAGGED_COLUMNS]
    return pa.schema(fields + (list(EXPLAIN_FIELDS) if explain else []))
