"""Where a CPU first-step UNet pass spends its time, and which attention kernel is fastest (run on an idle machine).

Part 1: wall time per UNet module (forward hooks) for one batch, full forward (no shared head), fp32 and bf16.
Part 2: scaled-dot-product attention at the first level's shape, per backend.
Usage: python bench/cpu_profile.py [--preset small] [--batch 16]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

from auditor.toy.models import PRESETS, build_random_components  # noqa: E402


def timed_modules(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """ResNets, transformer models and their self-attention, cross-attention and feed-forward, by position."""
    modules: dict[str, torch.nn.Module] = {}
    for side, blocks in (("down", unet.down_blocks), ("up", unet.up_blocks)):
        for i, block in enumerate(blocks):
            for j, resnet in enumerate(block.resnets):
                modules[f"{side}{i}.resnet{j}"] = resnet
            for j, attention in enumerate(getattr(block, "attentions", None) or []):
                modules[f"{side}{i}.transformer{j}"] = attention
                first = attention.transformer_blocks[0]
                modules[f"{side}{i}.transformer{j}.self_attn"] = first.attn1
                modules[f"{side}{i}.transformer{j}.cross_attn"] = first.attn2
                modules[f"{side}{i}.transformer{j}.ff"] = first.ff
    modules["mid"] = unet.mid_block
    return modules


def module_times(preset: str, dtype: torch.dtype, batch: int, repeats: int = 3) -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    components = build_random_components(PRESETS[preset], "cpu", dtype)
    unet, text_encoder = components.unet, components.text_encoder
    unet.set_attn_processor(AttnProcessor2_0())  # SDPA, and no shared head: the whole forward is timed
    spent: dict[str, float] = defaultdict(float)
    started: dict[str, float] = {}
    for name, module in timed_modules(unet).items():
        module.register_forward_pre_hook(
            lambda m, a, name=name: started.__setitem__(name, time.perf_counter())
        )
        module.register_forward_hook(
            lambda m, a, o, name=name: spent.__setitem__(
                name, spent[name] + time.perf_counter() - started[name]
            )
        )
    size = unet.config.sample_size
    sample = torch.randn(batch, unet.config.in_channels, size, size, dtype=dtype)
    ids = torch.randint(0, text_encoder.config.vocab_size, (batch, 77))
    with torch.no_grad():
        embeds = text_encoder(ids)[0]
        unet(sample, 981, encoder_hidden_states=embeds)  # warm-up
        spent.clear()
        begin = time.perf_counter()
        for _ in range(repeats):
            unet(sample, 981, encoder_hidden_states=embeds)
        total = (time.perf_counter() - begin) / repeats
    print(
        f"\n{preset} {str(dtype).removeprefix('torch.')} batch {batch}: UNet {total * 1000:.0f} ms per batch"
    )
    print(f"{'module':28} {'ms':>8} {'share':>7}")
    for name, seconds in sorted(spent.items(), key=lambda item: -item[1]):
        share = seconds / repeats / total
        if share >= 0.02:
            print(f"{name:28} {seconds / repeats * 1000:8.1f} {share:7.1%}")


def best_of(fn: Callable[[], torch.Tensor], repeats: int = 5) -> float:
    fn()
    begin = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - begin) / repeats * 1000


def kernel_times(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[float, float, float]:
    """ms per call: SDPA's default (flash) kernel, SDPA's math backend, explicit matmul + softmax."""
    scale = q.shape[-1] ** -0.5
    with torch.no_grad():
        flash = best_of(lambda: F.scaled_dot_product_attention(q, k, v))
        with sdpa_kernel(SDPBackend.MATH):
            math = best_of(lambda: F.scaled_dot_product_attention(q, k, v))
        explicit = best_of(lambda: torch.matmul((q @ k.transpose(-1, -2) * scale).softmax(-1), v))
    return flash, math, explicit


def attention_kernels(batch: int, heads: int, positions: int, head_dim: int) -> None:
    print(f"\nattention (B, heads, L, d) = ({batch}, {heads}, {positions}, {head_dim}), ms per call")
    print(f"{'dtype':9} {'flash (SDPA default)':>21} {'math backend':>13} {'matmul+softmax':>15}")
    for dtype in (torch.float32, torch.bfloat16):
        flash, math, explicit = kernel_times(
            *(torch.randn(batch, heads, positions, head_dim, dtype=dtype) for _ in range(3))
        )
        print(f"{str(dtype).removeprefix('torch.'):9} {flash:21.1f} {math:13.1f} {explicit:15.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    spec = PRESETS[args.preset]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, preset {args.preset}")
    for dtype in (torch.float32, torch.bfloat16):
        module_times(args.preset, dtype, args.batch)
    heads = spec.attention_head_dim  # diffusers' SD configs put the head count in attention_head_dim
    attention_kernels(args.batch, heads, spec.sample_size**2, spec.block_out_channels[0] // heads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
