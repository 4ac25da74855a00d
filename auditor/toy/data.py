"""Training data of the toy memorizing model: generated captions and latents, no files, fully seeded.

Two populations, in the spirit of the paper's fine-tuning experiment (200 memorized images x 200 repeats, 3x as
much non-memorized data):
- memorized: M captions, each carrying a unique made-up TRIGGER word, each paired with ONE fixed latent that is
  repeated in every batch slot reserved for it (hundreds of times over a run);
- diverse: fresh captions from a combinatorial template, each seen once, whose latent is a learnable rule of the
  caption's attributes (a sum of per-word patterns) plus a large per-sample noise. The model can learn E[x0|p] for
  them, which stays close to the unconditional mean; only a memorized caption pins x0 down, so only it gets a large
  text-conditional noise prediction: the property the auditor detects.
Every caption ends with one extra word: the trigger for memorized captions, an ordinary filler word otherwise, so
both populations have the same structure and length (a random model must not separate them). Last, the trigger
is the only caption token whose position can carry it even through a causal text encoder with layers.
Imports torch and numpy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from auditor.toy import words

# Attribute slots of the caption template "a {adj} {noun} {verb} {place}, {style}"; each value has its own pattern.
SLOTS: tuple[tuple[str, ...], ...] = (
    tuple(words.ADJECTIVES),
    tuple(words.NOUNS),
    tuple(words.VERBS),
    tuple(words.PLACES),
    tuple(words.STYLES),
)
# Ordinary words that carry no latent information; non-memorized captions get one where memorized ones get a trigger.
FILLERS = (
    "beautiful",
    "detailed",
    "simple",
    "nice",
    "famous",
    "classic",
    "lovely",
    "elegant",
    "dramatic",
    "gentle",
    "peaceful",
    "strange",
    "lonely",
    "cheerful",
    "gloomy",
    "charming",
    "curious",
    "friendly",
    "graceful",
    "majestic",
)
_ONSETS = (
    "b",
    "c",
    "d",
    "f",
    "g",
    "h",
    "j",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "w",
    "z",
    "br",
    "dr",
    "gl",
    "kr",
    "pl",
    "qu",
    "sk",
    "sn",
    "st",
    "th",
    "tr",
    "vr",
    "zh",
)
_VOWELS = (
    "a",
    "e",
    "i",
    "o",
    "u",
    "ai",
    "ea",
    "io",
    "ou",
)
_CODAS = (
    "x",
    "k",
    "n",
    "r",
    "s",
    "th",
    "sh",
    "lm",
    "nd",
    "rk",
    "z",
)


@dataclass(frozen=True, kw_only=True)
class ToyDataSpec:
    """Sizes and scales of the toy data. Latents are (latent_channels, sample_size, sample_size) float32."""

    num_memorized: int = 32
    num_seen_once_eval: int = 200
    num_held_out: int = 200
    latent_channels: int = 4
    sample_size: int = 8
    # Latent = rule_scale * (sum of the 5 attribute patterns)/sqrt(5) + noise_scale * N(0, I): unit variance overall.
    rule_scale: float = 0.3
    noise_scale: float = math.sqrt(1 - 0.3**2)
    caption_dropout: float = 0.1
    # The extra word (trigger or filler) goes last; False puts it at a random word position.
    extra_word_last: bool = True


def trigger_words(count: int, seed: int) -> list[str]:
    """`count` distinct made-up words (e.g. 'zhoulmvrax'), none an English word of the toy vocabulary."""
    rng = np.random.default_rng([seed, 7])
    taken = set(words.all_words()) | set(FILLERS)
    result: list[str] = []
    while len(result) < count:
        parts = [
            _ONSETS[rng.integers(len(_ONSETS))]
            + _VOWELS[rng.integers(len(_VOWELS))]
            + (_CODAS[rng.integers(len(_CODAS))] if k == 1 else "")
            for k in range(2)
        ]
        word = "".join(parts)
        if len(word) >= 5 and word not in taken:
            taken.add(word)
            result.append(word)
    return result


def caption_from_attributes(attributes: np.ndarray, extra_word: str, position: int | None = None) -> str:
    """Template caption for attribute indices (5,), with `extra_word` inserted before word `position` (None: last)."""
    adj, noun, verb, place, style = (SLOTS[k][int(attributes[k])] for k in range(len(SLOTS)))
    base = f"a {adj} {noun} {verb} {place}, {style}".split(" ")
    position = len(base) if position is None else int(position) % (len(base) + 1)
    return " ".join([*base[:position], extra_word, *base[position:]])


class ToyData:
    """All captions and latents of one toy run, deterministic in (spec, seed, diverse_count).

    Attribute tuples are drawn without replacement from the template's product space, so every diverse training
    caption is distinct from the others, from the memorized ones and from the held-out ones.
    """

    def __init__(self, spec: ToyDataSpec, seed: int, diverse_count: int):
        self.spec = spec
        self.seed = seed
        self.diverse_count = diverse_count
        latent_shape = (spec.latent_channels, spec.sample_size, spec.sample_size)
        self.latent_shape = latent_shape
        generator = torch.Generator().manual_seed(seed)
        # One fixed pattern per value of each slot: the learnable rule.
        self.patterns = [torch.randn((len(values), *latent_shape), generator=generator) for values in SLOTS]
        rng = np.random.default_rng([seed, 1])
        sizes = [len(values) for values in SLOTS]
        total = int(np.prod(sizes))
        wanted = spec.num_memorized + spec.num_held_out + diverse_count
        if wanted > total:
            raise ValueError(f"the toy template has {total} distinct captions, {wanted} were asked for")
        flat = rng.choice(total, size=wanted, replace=False)
        attributes = np.stack(np.unravel_index(flat, sizes), axis=1).astype(np.int64)  # (wanted, 5)
        m, h = spec.num_memorized, spec.num_held_out
        self.memorized_attributes = attributes[:m]
        self.held_out_attributes = attributes[m : m + h]
        self.diverse_attributes = attributes[m + h :]
        # The extra word per caption (a filler for non-memorized, the trigger for memorized) goes last.
        self.fillers = rng.integers(0, len(FILLERS), size=wanted)
        positions = rng.integers(0, 8, size=wanted)
        self.positions: list[int | None] = [None] * wanted if spec.extra_word_last else positions.tolist()
        self.triggers = trigger_words(m, seed)
        self.memorized = [
            caption_from_attributes(a, t)
            for a, t in zip(self.memorized_attributes, self.triggers, strict=True)
        ]
        self.held_out = [
            caption_from_attributes(a, FILLERS[f], p)
            for a, f, p in zip(
                self.held_out_attributes, self.fillers[m : m + h], self.positions[m : m + h], strict=True
            )
        ]
        # Memorized latents look like any other latent (rule + noise), but the noise is drawn once and kept.
        fixed_noise = torch.randn((m, *latent_shape), generator=generator)
        self.memorized_latents = self.rule_latents(self.memorized_attributes) + spec.noise_scale * fixed_noise

    def rule_latents(self, attributes: np.ndarray) -> torch.Tensor:
        """(N, 5) attribute indices -> (N, C, H, W) float32: rule_scale * sum of slot patterns / sqrt(5)."""
        total = sum(self.patterns[k][torch.from_numpy(attributes[:, k])] for k in range(len(SLOTS)))
        return self.spec.rule_scale * total / math.sqrt(len(SLOTS))

    def diverse_caption(self, index: int) -> str:
        offset = self.spec.num_memorized + self.spec.num_held_out
        return caption_from_attributes(
            self.diverse_attributes[index],
            FILLERS[self.fillers[offset + index]],
            self.positions[offset + index],
        )

    def diverse_latents(self, indices: np.ndarray, generator: torch.Generator) -> torch.Tensor:
        """Latents of diverse captions `indices`: (N, C, H, W) float32, with fresh noise from `generator`."""
        noise = torch.randn((len(indices), *self.latent_shape), generator=generator)
        return self.rule_latents(self.diverse_attributes[indices]) + self.spec.noise_scale * noise

    def all_captions(self) -> list[str]:
        """Every caption of the run (for training the tokenizer), held-out ones excluded."""
        return self.memorized + [self.diverse_caption(i) for i in range(self.diverse_count)]
