"""Captions -> token ids, exactly as StableDiffusionPipeline.encode_prompt tokenizes them. numpy + tokenizer only.

One implementation shared by `Scorer.tokenize` and the pipeline's CPU stage, so both give the same ids. Never
imports torch (`load_tokenizer` does not go through `transformers.AutoTokenizer`, which does).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from auditor.errors import InputDataError


@dataclass(frozen=True)
class TokenizedCaptions:
    """Captions tokenized as StableDiffusionPipeline.encode_prompt does (pad to max length, truncate).

    input_ids, attention_mask: (B, L) int64. n_tokens: (B,) int32, the caption's tokens before truncation,
    special tokens excluded. truncated: (B,) bool, True when tokens were cut to fit L.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    n_tokens: np.ndarray
    truncated: np.ndarray

    def __len__(self) -> int:
        return len(self.input_ids)


def load_tokenizer(folder: Path) -> Any:
    """The tokenizer of a model's `tokenizer/` folder, the class AutoTokenizer would pick, without torch.

    `transformers.AutoTokenizer` imports torch (through its configuration classes), about 1 GiB of a CPU worker
    that only tokenizes; the class named by `tokenizer_config.json` (its fast variant first, as AutoTokenizer
    prefers it) loads without. A folder that names no class, or one transformers lacks, falls back to AutoTokenizer.
    """
    import transformers

    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    name = config.get("tokenizer_class")
    if isinstance(name, str) and name:
        for candidate in (name if name.endswith("Fast") else f"{name}Fast", name):
            cls = getattr(transformers, candidate, None)
            if cls is not None:
                return cls.from_pretrained(folder)
    return transformers.AutoTokenizer.from_pretrained(folder)


def validate_captions(captions: Sequence[Any]) -> list[str]:
    if isinstance(captions, str):
        raise InputDataError("captions must be a list of strings, got one string; wrap it: [caption].")
    result = list(captions)
    for index, caption in enumerate(result):
        if not isinstance(caption, str):
            raise InputDataError(
                f"caption at index {index} is {type(caption).__name__} ({caption!r:.60}), expected str. "
                "Drop or fix that row (the audit pipeline records such rows with a status instead)."
            )
    return result


def tokenize_one_caption(tokenizer: Any, caption: Any, purpose: str) -> TokenizedCaptions:
    """One caption that must keep at least one token (explain, mitigate); the error says what it was for."""
    if not isinstance(caption, str):
        raise InputDataError(f"caption must be a str, got {type(caption).__name__} ({caption!r:.60}).")
    tokens = tokenize_captions(tokenizer, [caption])
    if int(tokens.n_tokens[0]) == 0:
        raise InputDataError(
            f"caption {caption!r} has no tokens once BOS/EOS are removed: nothing to {purpose}. "
            "Pass a non-empty caption."
        )
    return tokens


def tokenize_captions(tokenizer: Any, captions: Sequence[str]) -> TokenizedCaptions:
    """Pad to `tokenizer.model_max_length` and truncate; count tokens before the cut for `n_tokens`/`truncated`."""
    captions = validate_captions(captions)
    max_length = int(tokenizer.model_max_length)
    if not captions:
        empty = np.zeros((0, max_length), dtype=np.int64)
        return TokenizedCaptions(empty, empty.copy(), np.zeros(0, np.int32), np.zeros(0, bool))
    padded = tokenizer(
        captions, padding="max_length", max_length=max_length, truncation=True, return_tensors="np"
    )
    # A second pass without truncation only to count tokens; cheap next to one UNet row.
    full_lengths = np.array(
        [len(ids) for ids in tokenizer(captions, truncation=False, verbose=False)["input_ids"]],
        dtype=np.int32,
    )
    n_special_tokens = len(tokenizer("")["input_ids"])
    return TokenizedCaptions(
        input_ids=padded["input_ids"].astype(np.int64),
        attention_mask=padded["attention_mask"].astype(np.int64),
        n_tokens=np.maximum(full_lengths - n_special_tokens, 0),
        truncated=full_lengths > max_length,
    )
