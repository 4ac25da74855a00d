"""CPU stage: validate captions and tokenize them exactly as `Scorer.tokenize` does, without loading the model.

Imports transformers lazily (only the tokenizer folder is read); never imports ray, torch or diffusers.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from auditor import schema
from auditor.scoring.tokens import PackedTokenizer, TokenizedCaptions

logger = logging.getLogger(__name__)

TOKEN_COLUMNS = (schema.N_TOKENS, schema.TRUNCATED, schema.INPUT_IDS, schema.ATTENTION_MASK)


class CaptionTokenizer:
    """The model family's tokenizers alone (no model weights), tokenizing with the same `PackedTokenizer` as
    `Scorer.tokenize`: every tokenizer's ids side by side in one row (SDXL two, SD3 three, SD and PixArt one).
    """

    def __init__(self, tokenizer: PackedTokenizer):
        self.tokenizer = tokenizer
        self.max_length = int(tokenizer.max_length)

    @classmethod
    def from_model(
        cls, model: str, storage_options: dict[str, Any] | None = None, variant: str | None = None
    ) -> CaptionTokenizer:
        """variant: only where `model` is remote, for which copy of it to read (`resolve_model_dir`)."""
        return _cached_tokenizer(model, tuple(sorted((storage_options or {}).items())), variant)

    def tokenize(self, captions: Sequence[str]) -> TokenizedCaptions:
        return self.tokenizer.tokenize(captions)


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(
    model: str, storage_items: tuple[tuple[str, Any], ...], variant: str | None = None
) -> CaptionTokenizer:
    """One tokenizer per worker process: Ray reuses worker processes across tasks."""
    from auditor.scoring.layout import detect_layout
    from auditor.scoring.loading import resolve_model_dir
    from auditor.scoring.tokens import load_packed_tokenizer

    root = resolve_model_dir(model, dict(storage_items), variant)
    return CaptionTokenizer(load_packed_tokenizer(root, detect_layout(root)))


def _fixed_lists(matrix: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])


def tokenize_table(table: pa.Table, tokenizer: CaptionTokenizer) -> pa.Table:
    """Name null and blank captions in `status`, tokenize the rest.

    Adds n_tokens (int32), truncated (bool), both null for rows that will not be scored, and the internal
    _input_ids / _attention_mask columns: fixed-size lists of L int64, zeros for rows that will not be scored.
    """
    table = table.drop_columns([c for c in TOKEN_COLUMNS if c in table.column_names])
    status = table.column(schema.STATUS)
    caption = table.column(schema.CAPTION)
    is_ok = pc.equal(status, schema.OK)
    blank = pc.equal(pc.utf8_trim_whitespace(pc.fill_null(caption, "")), "")
    status = pc.if_else(pc.and_(is_ok, pc.is_null(caption)), schema.NULL_CAPTION, status)
    status = pc.if_else(pc.and_(pc.equal(status, schema.OK), blank), schema.EMPTY_CAPTION, status)
    ok = np.asarray(pc.equal(status, schema.OK).to_numpy(zero_copy_only=False), dtype=bool)
    n = table.num_rows
    length = tokenizer.max_length
    input_ids = np.zeros((n, length), dtype=np.int64)
    attention_mask = np.zeros((n, length), dtype=np.int64)
    n_tokens = np.zeros(n, dtype=np.int32)
    truncated = np.zeros(n, dtype=bool)
    if ok.any():
        captions = caption.filter(pa.array(ok)).to_pylist()
        tokens = tokenizer.tokenize(captions)
        input_ids[ok], attention_mask[ok] = tokens.input_ids, tokens.attention_mask
        n_tokens[ok], truncated[ok] = tokens.n_tokens, tokens.truncated
    not_scored = pa.array(~ok)
    table = table.set_column(table.schema.get_field_index(schema.STATUS), schema.STATUS, status)
    return (
        table.append_column(
            pa.field(schema.N_TOKENS, pa.int32()), pc.if_else(not_scored, None, pa.array(n_tokens))
        )
        .append_column(
            pa.field(schema.TRUNCATED, pa.bool_()), pc.if_else(not_scored, None, pa.array(truncated))
        )
        .append_column(schema.INPUT_IDS, _fixed_lists(input_ids))
        .append_column(schema.ATTENTION_MASK, _fixed_lists(attention_mask))
    )


def tokenized_from_table(table: pa.Table):
    """(TokenizedCaptions of the rows, row mask) from a tokenize_table output, for the rows with status ok."""
    ok = np.asarray(
        pc.equal(table.column(schema.STATUS), schema.OK).to_numpy(zero_copy_only=False), dtype=bool
    )

    def matrix(name: str) -> np.ndarray:
        column = table.column(name).combine_chunks()
        width = column.type.list_size
        return column.flatten().to_numpy().reshape(-1, width)[ok]

    tokens = TokenizedCaptions(
        input_ids=matrix(schema.INPUT_IDS),
        attention_mask=matrix(schema.ATTENTION_MASK),
        n_tokens=table.column(schema.N_TOKENS).to_numpy(zero_copy_only=False)[ok].astype(np.int32),
        truncated=table.column(schema.TRUNCATED).to_numpy(zero_copy_only=False)[ok].astype(bool),
    )
    return tokens, ok
