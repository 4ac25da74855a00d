"""The caption-independent head of the first-step UNet pass, computed once per x_T instead of once per caption.

Every caption starts from the same x_T^(k) at the same t1, and in a Stable Diffusion UNet the text enters only
through cross-attention. So everything before the first cross-attention is the same for every caption: conv_in,
the first ResNet and, most expensive of all, the first transformer block's self-attention over every latent
position (13–18% of the small benchmark model's forward on CPU, BENCHMARKS.md §1). `FirstSelfAttentionCache` is
a diffusers attention processor for that first self-attention: it records the output on the uncond pass of x_T
and hands it back, broadcast over the batch, to every caption's pass on the same x_T.

Where the UNet's design does not guarantee that independence (class or added embeddings in the time embedding,
an attn1 that attends to the text), `attach` returns no cache; `Scorer` also checks the cache against a full
forward before trusting it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


class FirstSelfAttentionCache:
    """Attention processor for the first self-attention: records, replays, or passes through to `inner`."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.stored: dict[bytes, torch.Tensor] = {}
        self.recording_key: bytes | None = None
        self.replay_key: bytes | None = None

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        cached = self.stored.get(self.replay_key) if self.replay_key is not None else None
        # No counters or other state changes on this path: torch.compile would recompile on each one.
        if cached is not None and encoder_hidden_states is None and attention_mask is None:
            return cached.expand(hidden_states.shape[0], *cached.shape[1:])
        output = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if self.recording_key is not None:
            # One row: the recording pass is the batch-1 uncond pass of one x_T.
            self.stored[self.recording_key] = output[:1].detach().clone()
        return output

    @contextmanager
    def recording(self, key: bytes) -> Iterator[None]:
        self.recording_key = key
        try:
            yield
        finally:
            self.recording_key = None

    @contextmanager
    def replaying(self, key: bytes) -> Iterator[None]:
        self.replay_key = key
        try:
            yield
        finally:
            self.replay_key = None


def first_self_attention(unet: torch.nn.Module) -> tuple[torch.nn.Module | None, str]:
    """The first transformer block's self-attention module, if nothing before it can see the caption.

    Returns (module, "") or (None, why not).
    """
    config = getattr(unet, "config", None)
    if config is None or not hasattr(unet, "down_blocks"):
        return None, "not a diffusers UNet2DConditionModel"
    for field in ("class_embed_type", "addition_embed_type", "time_cond_proj_dim"):
        if getattr(config, field, None) is not None:
            return None, f"the time embedding depends on more than t ({field}={getattr(config, field)!r})"
    for block in unet.down_blocks:
        attentions = getattr(block, "attentions", None)
        if not attentions:
            continue  # a block without attention sees no text
        transformer_blocks = getattr(attentions[0], "transformer_blocks", None)
        if not transformer_blocks:
            return None, f"first attention is {type(attentions[0]).__name__}, not a Transformer2DModel"
        first = transformer_blocks[0]
        attn1 = getattr(first, "attn1", None)
        if (
            attn1 is None
            or getattr(attn1, "is_cross_attention", True)
            or getattr(first, "only_cross_attention", False)
        ):
            return None, "the first transformer block's attn1 attends to the text"
        if getattr(first, "norm_type", "layer_norm") != "layer_norm":
            return None, f"the first transformer block's norm is {first.norm_type!r}"
        if (
            getattr(first, "pos_embed", None) is not None
            or getattr(attentions[0], "is_input_continuous", True) is False
        ):
            return None, "the first transformer block is not a plain continuous-input block"
        return attn1, ""
    return None, "the UNet has no transformer block"


def attach(unet: torch.nn.Module) -> tuple[FirstSelfAttentionCache | None, str]:
    """Install (or find, when another Scorer already did) the cache on `unet`; (None, why) when unsafe."""
    attn1, reason = first_self_attention(unet)
    if attn1 is None:
        return None, reason
    processor = attn1.processor
    if not isinstance(processor, FirstSelfAttentionCache):
        processor = FirstSelfAttentionCache(processor)
        attn1.set_processor(processor)
    return processor, ""
