"""Captions -> token ids, exactly as each pipeline's encode_prompt tokenizes them. numpy + tokenizers only.

One implementation shared by `Scorer.tokenize` and the pipeline's CPU stage, so both give the same ids. A family
with several tokenizers (SDXL: two CLIPs; SD3: two CLIPs and T5) packs their padded ids side by side into one
(B, L_total) matrix (`PackedTokenizer`): dedup, caching and the pipeline's fixed-size id column stay family-blind. Never
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

    def take(self, rows: np.ndarray) -> TokenizedCaptions:
        """The rows selected by a (B,) bool mask or an index array, in that order."""
        return TokenizedCaptions(
            self.input_ids[rows], self.attention_mask[rows], self.n_tokens[rows], self.truncated[rows]
        )


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
                return tokenizer_from_pretrained(cls, folder)
    return tokenizer_from_pretrained(transformers.AutoTokenizer, folder)


# What tokenizers < 0.20 says of a tokenizer.json whose BPE merges are pairs (the format 0.20 and later write).
PAIR_MERGES_ERROR = "untagged enum ModelWrapper"


def tokenizer_from_pretrained(cls: Any, folder: Path) -> Any:
    """`cls.from_pretrained(folder)`; where the installed tokenizers is older than the one that wrote the folder's
    tokenizer.json (the shipped toys' is written by tokenizers >= 0.20), with that file's merges rewritten."""
    try:
        return cls.from_pretrained(folder)
    except Exception as exc:  # tokenizers raises a bare Exception for a file it cannot parse
        if PAIR_MERGES_ERROR not in str(exc) or not (folder / "tokenizer.json").is_file():
            raise
        return cls.from_pretrained(
            folder, tokenizer_object=tokenizer_with_string_merges(folder / "tokenizer.json")
        )


def tokenizer_with_string_merges(path: Path) -> Any:
    """The `tokenizers.Tokenizer` of a tokenizer.json, its BPE merges written as "a b" strings: tokenizers 0.20
    writes them as ["a", "b"] pairs (a token may hold a space), which only 0.20 and later read. Same ids, as long
    as no merged token holds a space (true of CLIP's and GPT-2's byte-level BPE)."""
    from tokenizers import Tokenizer

    data = json.loads(path.read_text(encoding="utf-8"))
    merges = data.get("model", {}).get("merges")
    if isinstance(merges, list):
        data["model"]["merges"] = [" ".join(pair) if isinstance(pair, list) else pair for pair in merges]
    return Tokenizer.from_str(json.dumps(data))


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
    """One caption that must keep at least one token (explain, mitigate); the error says what it was for.

    tokenizer: a `PackedTokenizer` or one transformers tokenizer.
    """
    if not isinstance(caption, str):
        raise InputDataError(f"caption must be a str, got {type(caption).__name__} ({caption!r:.60}).")
    if isinstance(tokenizer, PackedTokenizer):
        tokens = tokenizer.tokenize([caption])
    else:
        tokens = tokenize_captions(tokenizer, [caption])
    if int(tokens.n_tokens[0]) == 0:
        raise InputDataError(
            f"caption {caption!r} has no tokens once BOS/EOS are removed: nothing to {purpose}. "
            "Pass a non-empty caption."
        )
    return tokens


def tokenize_captions(
    tokenizer: Any, captions: Sequence[str], max_length: int | None = None
) -> TokenizedCaptions:
    """Pad to `max_length` (default `tokenizer.model_max_length`) and truncate, as encode_prompt does; count tokens
    before the cut for `n_tokens`/`truncated`.
    """
    captions = validate_captions(captions)
    max_length = int(tokenizer.model_max_length if max_length is None else max_length)
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


class PackedTokenizer:
    """A family's tokenizers, each padded to its own length, their ids packed side by side: (B, sum of lengths).

    parts: (folder, tokenizer, max_length) in packing order; main: the part whose counts give n_tokens/truncated.
    With one part, `tokenize` is exactly `tokenize_captions(tokenizer, captions, max_length)`.
    """

    def __init__(self, parts: Sequence[tuple[str, Any, int]], main: int = 0):
        if not parts:
            raise ValueError("a PackedTokenizer needs at least one tokenizer")
        self.parts = [(name, tokenizer, int(length)) for name, tokenizer, length in parts]
        self.main = main
        self.widths = [length for _, _, length in self.parts]
        self.max_length = sum(self.widths)

    @property
    def main_tokenizer(self) -> Any:
        return self.parts[self.main][1]

    def tokenize(self, captions: Sequence[str]) -> TokenizedCaptions:
        captions = validate_captions(captions)
        pieces = [tokenize_captions(tokenizer, captions, length) for _, tokenizer, length in self.parts]
        if len(pieces) == 1:
            return pieces[0]
        main = pieces[self.main]
        return TokenizedCaptions(
            input_ids=np.concatenate([p.input_ids for p in pieces], axis=1),
            attention_mask=np.concatenate([p.attention_mask for p in pieces], axis=1),
            n_tokens=main.n_tokens,
            truncated=main.truncated,
        )

    def split(self, matrix: Any) -> list[Any]:
        """(B, max_length) packed ids or masks (numpy or torch) -> one (B, L_i) block per part, in order."""
        blocks, start = [], 0
        for width in self.widths:
            blocks.append(matrix[:, start : start + width])
            start += width
        return blocks

    def part(self, name: str) -> tuple[Any, int, int]:
        """(tokenizer, first column, width) of part `name` in the packed matrix."""
        start = 0
        for folder, tokenizer, width in self.parts:
            if folder == name:
                return tokenizer, start, width
            start += width
        raise KeyError(name)


def load_packed_tokenizer(root: Any, layout: Any) -> PackedTokenizer:
    """The family's tokenizers from the model folder `root` (a `FamilyLayout`'s slots), without any weights.

    A slot whose folder is recorded as null (SD3 without T5) is left out: its encoder is absent too.
    """
    import transformers

    from auditor.scoring.layout import present_components

    transformers.utils.logging.disable_progress_bar()
    present = set(present_components(root, layout))
    loaded = {
        slot.folder: load_tokenizer(root / slot.folder)
        for slot in layout.tokenizers
        if slot.folder in present
    }
    parts = []
    for slot in layout.tokenizers:
        if slot.folder not in loaded:
            continue
        tokenizer = loaded[slot.folder]
        if slot.max_length is not None:
            length = slot.max_length
        elif slot.length_from is not None:
            length = int(loaded[slot.length_from].model_max_length)
        else:
            length = int(tokenizer.model_max_length)
        parts.append((slot.folder, tokenizer, length))
    return PackedTokenizer(parts, main=layout.main_tokenizer)
