"""Random pipelines of every model family from configs (SDXL, SD3, PixArt), with tokenizers built offline.

For tests and throughput benchmarks: the weights are random, the shapes are presets and the scorer reads every
shape from the saved configs. The CLIP tokenizers are the toy's byte-level BPE (`auditor.toy.tokenizer`); T5's is a
small Unigram trained here with `tokenizers` and saved as a T5TokenizerFast. Nothing is downloaded.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from auditor.toy.models import SD_V1_SCHEDULER, TINY, build_vae, default_corpus
from auditor.toy.tokenizer import build_clip_tokenizer

T5_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")
# SD v1's noise schedule without DDIM's own options: what Euler and DPM-Solver schedulers (SDXL, PixArt) take.
SD_V1_NOISE_SCHEDULE = {
    k: v for k, v in SD_V1_SCHEDULER.items() if k not in ("clip_sample", "set_alpha_to_one")
}


def build_t5_tokenizer(
    corpus: Iterable[str], out_dir: str | Path, vocab_size: int = 600, model_max_length: int = 512
):
    """Train a small Unigram on `corpus` and save it as a T5TokenizerFast folder (pad 0, eos 1, unk 2)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, T5TokenizerFast

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=list(T5_SPECIAL_TOKENS), unk_token="<unk>", show_progress=False
    )
    tokenizer.train_from_iterator(list(corpus), trainer=trainer)
    eos = tokenizer.token_to_id("</s>")
    # T5 appends </s> and has no BOS.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)]
    )
    fast = T5TokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=model_max_length,
    )
    out_dir = Path(out_dir)
    fast.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


def clip_text_model(vocab_size: int, hidden: int, *, projection_dim: int | None = None, layers: int = 2):
    """A CLIP text encoder; with projection_dim, the CLIPTextModelWithProjection SDXL/SD3 take pooled text from."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        hidden_act="gelu",
        projection_dim=projection_dim or hidden,
    )
    return CLIPTextModelWithProjection(config) if projection_dim else CLIPTextModel(config)


def t5_encoder(
    vocab_size: int,
    d_model: int,
    layers: int = 2,
    *,
    d_kv: int = 8,
    d_ff: int | None = None,
    num_heads: int = 4,
    buckets: int = 8,
    feed_forward_proj: str = "relu",
):
    """A T5 encoder (pad 0, eos 1); the defaults are the tests' tiny one, d_ff None meaning 2 x d_model."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_kv,
        d_ff=2 * d_model if d_ff is None else d_ff,
        num_layers=layers,
        num_heads=num_heads,
        relative_attention_num_buckets=buckets,
        feed_forward_proj=feed_forward_proj,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config)


@dataclass(frozen=True)
class Tokenizers:
    clip: object
    clip_2: object
    t5: object


def build_tokenizers(out_dir: Path, seed: int, *, t5: bool = True, t5_max_length: int = 512) -> Tokenizers:
    corpus = default_corpus(seed)
    clip = build_clip_tokenizer(corpus, out_dir / "tokenizer", vocab_size=600)
    clip_2 = build_clip_tokenizer(corpus, out_dir / "tokenizer_2", vocab_size=700)
    t5_tokenizer = (
        build_t5_tokenizer(corpus, out_dir / "tokenizer_3", model_max_length=t5_max_length) if t5 else None
    )
    return Tokenizers(clip, clip_2, t5_tokenizer)


def build_random_sdxl(
    out_dir: str | Path, *, seed: int = 0, force_zeros_for_empty_prompt: bool = True
) -> Path:
    """A random StableDiffusionXLPipeline folder: two CLIPs (32 wide), a text_time UNet at 4x16x16 latents."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizers = build_tokenizers(Path(scratch), seed, t5=False)
    torch.manual_seed(seed)
    text_encoder = clip_text_model(len(tokenizers.clip), 32)
    text_encoder_2 = clip_text_model(len(tokenizers.clip_2), 32, projection_dim=32)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        # 6 time ids x 8 + the pooled projection (32).
        projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64,
        norm_num_groups=1,
    )
    pipeline = StableDiffusionXLPipeline(
        vae=build_vae(TINY),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizers.clip,
        tokenizer_2=tokenizers.clip_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SD_V1_NOISE_SCHEDULE),
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
    )
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def build_random_sd3(out_dir: str | Path, *, seed: int = 0, t5: bool = True) -> Path:
    """A random StableDiffusion3Pipeline folder: two CLIPs (16 wide, pooled 2 x 32), T5 (32 wide) unless t5=False
    (then model_index.json records text_encoder_3/tokenizer_3 as null), an MMDiT at 4x16x16 latents.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizers = build_tokenizers(Path(scratch), seed, t5=t5)
    torch.manual_seed(seed)
    text_encoder = clip_text_model(len(tokenizers.clip), 16, projection_dim=32)
    text_encoder_2 = clip_text_model(len(tokenizers.clip_2), 16, projection_dim=32)
    text_encoder_3 = t5_encoder(len(tokenizers.t5), 32) if t5 else None
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        # The CLIPs' concatenated width (2 x 16) equals T5's, as SD3's 4096 is padded to T5's width.
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
        pos_embed_max_size=16,
    )
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=build_vae(TINY),
        text_encoder=text_encoder,
        tokenizer=tokenizers.clip,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizers.clip_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizers.t5,
    )
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def build_random_pixart(out_dir: str | Path, *, seed: int = 0, alpha: bool = False) -> Path:
    """A random PixArtSigmaPipeline (or PixArtAlphaPipeline) folder: T5 (32 wide) and a learned-sigma DiT at 4x8x8."""
    from diffusers import (
        DPMSolverMultistepScheduler,
        PixArtAlphaPipeline,
        PixArtSigmaPipeline,
        PixArtTransformer2DModel,
    )

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as scratch:
        t5_tokenizer = build_t5_tokenizer(default_corpus(seed), Path(scratch) / "tokenizer")
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=8,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        caption_channels=32,
        in_channels=4,
        cross_attention_dim=24,
        # learned sigma: the variance half beside the 4 epsilon channels.
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    pipeline_cls = PixArtAlphaPipeline if alpha else PixArtSigmaPipeline
    pipeline = pipeline_cls(
        tokenizer=t5_tokenizer,
        text_encoder=t5_encoder(len(t5_tokenizer), 32),
        vae=build_vae(TINY),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(**SD_V1_NOISE_SCHEDULE),
    )
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


BUILDERS = {"sdxl": build_random_sdxl, "sd3": build_random_sd3, "pixart-sigma": build_random_pixart}


def shaped_components(
    family: str, device: str | torch.device, dtype: torch.dtype, *, real: bool = True, seed: int = 0
):
    """In-memory random `ModelComponents` (no folder) of SDXL or SD3 at their real sizes and latent resolutions
    (SDXL: 4x128x128, CLIP-L + bigG; SD3 medium: 16x128x128, 24 MMDiT layers, CLIP-L + bigG + T5-XXL), or the
    tiny test shapes with real=False: for throughput, which does not depend on the weights' values. Vocabularies
    are the toy tokenizers' (it changes no FLOPs).
    """
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    from auditor.scoring.layout import BY_NAME
    from auditor.scoring.loading import ModelComponents
    from auditor.scoring.tokens import PackedTokenizer

    with tempfile.TemporaryDirectory() as scratch:
        tokenizers = build_tokenizers(Path(scratch), seed, t5=family == "sd3")
    torch.manual_seed(seed)
    clip_l, big_g = (768, 1280) if real else (16, 16)
    with torch.device(device):
        if family == "sdxl":
            modules = {
                "text_encoder": clip_text_model(len(tokenizers.clip), clip_l, layers=12 if real else 2),
                "text_encoder_2": clip_text_model(
                    len(tokenizers.clip_2), big_g, projection_dim=big_g, layers=32 if real else 2
                ),
            }
            denoiser = UNet2DConditionModel(
                sample_size=128 if real else 16,
                block_out_channels=(320, 640, 1280) if real else (32, 64),
                layers_per_block=2 if real else 1,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")[
                    : 3 if real else 2
                ],
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")[
                    -(3 if real else 2) :
                ],
                transformer_layers_per_block=(1, 2, 10) if real else (1, 2),
                attention_head_dim=(5, 10, 20) if real else (2, 4),
                use_linear_projection=True,
                addition_embed_type="text_time",
                addition_time_embed_dim=256 if real else 8,
                projection_class_embeddings_input_dim=(256 if real else 8) * 6 + big_g,
                cross_attention_dim=clip_l + big_g,
                norm_num_groups=32 if real else 1,
            )
            scheduler_config = dict(SD_V1_NOISE_SCHEDULE)
            parts = [("tokenizer", tokenizers.clip, 77), ("tokenizer_2", tokenizers.clip_2, 77)]
        elif family == "sd3":
            t5_width = 4096 if real else 32
            modules = {
                "text_encoder": clip_text_model(
                    len(tokenizers.clip), clip_l, projection_dim=clip_l, layers=12 if real else 2
                ),
                "text_encoder_2": clip_text_model(
                    len(tokenizers.clip_2), big_g, projection_dim=big_g, layers=32 if real else 2
                ),
                "text_encoder_3": t5_xxl(len(tokenizers.t5))
                if real
                else t5_encoder(len(tokenizers.t5), t5_width),
            }
            denoiser = SD3Transformer2DModel(
                sample_size=128 if real else 16,
                patch_size=2,
                in_channels=16 if real else 4,
                num_layers=24 if real else 2,
                attention_head_dim=64 if real else 8,
                num_attention_heads=24 if real else 4,
                joint_attention_dim=t5_width,
                caption_projection_dim=1536 if real else 32,
                pooled_projection_dim=clip_l + big_g,
                out_channels=16 if real else 4,
                pos_embed_max_size=192 if real else 16,
            )
            scheduler_config = {"num_train_timesteps": 1000, "shift": 3.0}
            parts = [
                ("tokenizer", tokenizers.clip, 77),
                ("tokenizer_2", tokenizers.clip_2, 77),
                ("tokenizer_3", tokenizers.t5, 256),
            ]
        else:
            raise ValueError(f"shaped_components builds sdxl or sd3, got {family!r}")
        for module in (*modules.values(), denoiser):
            torch.nn.Module.to(module, dtype).eval().requires_grad_(False)
    layout = BY_NAME[family]
    return ModelComponents(
        Path("<in-memory>"),
        tokenizers.clip,
        modules["text_encoder"],
        denoiser,
        scheduler_config,
        family=layout.name,
        modules=modules,
        packed_tokenizer=PackedTokenizer(parts),
        pipeline_config={"_class_name": layout.pipeline_classes[0]},
    )


def t5_xxl(vocab_size: int):
    """T5-v1.1-XXL's encoder shapes (4096 wide, 24 layers, 64 heads, gated GELU), as SD3 ships it."""
    return t5_encoder(
        vocab_size, 4096, 24, d_kv=64, d_ff=10240, num_heads=64, buckets=32, feed_forward_proj="gated-gelu"
    )
