"""Train a small byte-level BPE and save it as a CLIPTokenizer folder (vocab.json + merges.txt), offline.

The vocabulary is laid out like CLIP's: 256 byte symbols, the same with the end-of-word suffix, one token per
merge, then <|startoftext|> and <|endoftext|>; so any text (emoji, non-ASCII) tokenizes, as with the real one.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from pathlib import Path

from transformers import CLIPTokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
# CLIP's pre-tokenizer pattern (contractions, letter runs, single digits, other symbol runs).
CLIP_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def train_bpe_merges(corpus: Iterable[str], vocab_size: int) -> list[tuple[str, str]]:
    """Merges learned on `corpus` with CLIP's pre-tokenization, in byte-level symbols with '</w>' word ends."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(end_of_word_suffix=END_OF_WORD))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix=END_OF_WORD,
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(corpus), trainer=trainer)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer.model.save(scratch)
        lines = Path(scratch, "merges.txt").read_text(encoding="utf-8").splitlines()
    return [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]


def build_clip_tokenizer(
    corpus: Iterable[str], out_dir: str | Path, vocab_size: int = 1024, model_max_length: int = 77
) -> CLIPTokenizer:
    """Train merges on `corpus`, write a CLIPTokenizer folder to `out_dir`, and return the loaded tokenizer."""
    from tokenizers import pre_tokenizers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = train_bpe_merges(corpus, vocab_size)
    vocab: dict[str, int] = {}
    for token in [*alphabet, *(symbol + END_OF_WORD for symbol in alphabet), *("".join(m) for m in merges)]:
        vocab.setdefault(token, len(vocab))
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    with tempfile.TemporaryDirectory() as scratch:
        vocab_file, merges_file = Path(scratch, "vocab.json"), Path(scratch, "merges.txt")
        vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        merges_file.write_text(
            "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
        )
        tokenizer = CLIPTokenizer(
            str(vocab_file),
            str(merges_file),
            bos_token=BOS_TOKEN,
            eos_token=EOS_TOKEN,
            pad_token=EOS_TOKEN,
            unk_token=EOS_TOKEN,
            model_max_length=model_max_length,
        )
        tokenizer.save_pretrained(out_dir)
    return CLIPTokenizer.from_pretrained(out_dir)
