"""Model families: how each diffusers pipeline encodes a caption, what "unconditional" means, its first step, and
which output is scored. One small class per pipeline kind, behind one interface; `Scorer`, explain and mitigate
call the interface and never branch on the family.

Every family scores the same quantity: the L2 norm of the text-conditional part of the denoiser's prediction at
its sampler's first step, from x_T seeded by (seed, k). torch/diffusers/transformers only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from auditor.errors import ConfigError
from auditor.scoring import layout as layouts
from auditor.scoring import magnitude
from auditor.scoring.tokens import PackedTokenizer


@dataclass(frozen=True)
class Conditioning:
    """A batch of text conditioning as the denoiser takes it, batch on dim 0 of every tensor.

    embeds: (B, L, D) the token embeddings the denoiser attends to; pooled: (B, P) pooled text (SDXL, SD3) or
    None; mask: (B, L) int64 attention mask of embeds (PixArt's T5) or None.
    """

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.embeds.shape[0])

    def _map(self, fn: Any, masks: bool = True) -> Conditioning:
        return Conditioning(
            fn(self.embeds),
            None if self.pooled is None else fn(self.pooled),
            None if self.mask is None else (fn(self.mask) if masks else self.mask),
        )

    def expand(self, batch: int) -> Conditioning:
        return self._map(lambda t: t.expand(batch, *t.shape[1:]))

    def rows(self, start: int, stop: int) -> Conditioning:
        return self._map(lambda t: t[start:stop])

    def float(self) -> Conditioning:
        return self._map(lambda t: t.float(), masks=False)

    def to(self, dtype: torch.dtype) -> Conditioning:
        return self._map(lambda t: t.to(dtype), masks=False)

    def scaled(self, factor: float) -> Conditioning:
        """Embeddings (and pooled) times factor; the mask unchanged (the shared-prefix probe)."""
        return self._map(lambda t: t * factor, masks=False)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.embeds, self.pooled, self.mask) if t is not None]

    def with_tensors(self, tensors: list[torch.Tensor]) -> Conditioning:
        """The same fields, from `tensors()`-ordered replacements (CUDA-graph static inputs)."""
        values = iter(tensors)
        return Conditioning(
            next(values),
            None if self.pooled is None else next(values),
            None if self.mask is None else next(values),
        )

    @staticmethod
    def cat(first: Conditioning, second: Conditioning) -> Conditioning:
        """[first; second] along the batch, as the pipelines' CFG batch [uncond; cond]."""

        def join(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
            return None if a is None or b is None else torch.cat([a, b])

        return Conditioning(
            torch.cat([first.embeds, second.embeds]),
            join(first.pooled, second.pooled),
            join(first.mask, second.mask),
        )


@dataclass(frozen=True)
class TokenBlock:
    """Where one tokenizer's caption tokens sit: rows `first_row + i` of `Conditioning.embeds` hold token i of the
    part `tokenizer` (ids from column `first_column + skip` of the packed ids). `skip`: special tokens before the
    caption (CLIP's BOS: 1; T5: 0).
    """

    label: str
    tokenizer: str
    first_row: int
    skip: int


class ModelFamily:
    """One pipeline kind. Subclasses set the conventions (class data, each with its reason) and the four methods
    that differ: `encode`, `unconditional`, `denoise`, `scored_output`; the sampler is DDIM-50 unless overridden.
    """

    layout: ClassVar[layouts.FamilyLayout]
    # The README "Models" table reads these.
    scored: ClassVar[str]
    unconditional_rule: ClassVar[str]
    first_step: ClassVar[str]
    status: ClassVar[str]
    # The pipeline's own default guidance: used only by steps > 1 (the CFG trajectory) and sampling.
    guidance_scale: ClassVar[float]

    def __init__(
        self,
        components: Any,
        device: torch.device,
        dtype: torch.dtype,
        score_sigma: float | None = None,
    ):
        self.components = components
        self.device = device
        self.dtype = dtype
        self.tokenizer: PackedTokenizer = components.packed_tokenizer
        self.denoiser: torch.nn.Module = components.unet
        self.latent_shape = self.read_latent_shape()
        self.scheduler = self.build_scheduler(components.scheduler_config)
        # Kept on CPU: reading a timestep as a number must never wait on the GPU.
        self.timesteps = self.scheduler.timesteps.cpu()
        self.init_noise_sigma = float(getattr(self.scheduler, "init_noise_sigma", 1.0))
        # Steps of the trajectory walked before the first scored one (a fixed-sigma score starts with one).
        self.lead_in_steps = 0
        self.score_sigma = None if score_sigma is None else check_score_sigma(score_sigma)
        if self.score_sigma is not None and self.score_sigma != 1.0:
            self.score_at_sigma(self.score_sigma)

    @property
    def name(self) -> str:
        return self.layout.name

    # Sampler ---------------------------------------------------------------------------------------------------
    def build_scheduler(self, scheduler_config: dict[str, Any]) -> Any:
        """DDIM-50 from the model's own scheduler config: the paper's detection sampler."""
        return magnitude.build_ddim_scheduler(scheduler_config)

    def step(self, guided: torch.Tensor, index: int, sample: torch.Tensor) -> torch.Tensor:
        """x at step index+1 from the guided denoiser output at step `index` (the pipeline's scheduler.step)."""
        timestep = self.timesteps[index]
        return self.scheduler.step(self.sampler_output(guided), timestep, sample, return_dict=False)[0]

    @property
    def scorable_steps(self) -> int:
        """The most steps a score can average: the trajectory's steps after the lead-in."""
        return len(self.timesteps) - self.lead_in_steps

    def score_at_sigma(self, sigma: float) -> None:
        """Score at noise level sigma < 1 instead of the sampler's first step: only flow-matching families can."""
        raise ConfigError(
            f"--score-sigma {sigma:g} applies to flow-matching models (SD3 / SD3.5); a {self.name} model is scored "
            f"at its sampler's first timestep t1 = {int(self.timesteps[0])}. Drop --score-sigma."
        )

    def sampler_output(self, output: torch.Tensor) -> torch.Tensor:
        """The part of the denoiser output the sampler steps with (all of it unless a family drops channels)."""
        return output

    def read_latent_shape(self) -> tuple[int, int, int]:
        config = self.denoiser.config
        sample_size = config.sample_size
        height, width = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
        return (int(config.in_channels), int(height), int(width))

    @property
    def vae_scale_factor(self) -> int:
        """2 ** (VAE levels - 1) as every pipeline computes it; 8 without a VAE config, as they default."""
        vae = self.components.vae_config
        return 2 ** (len(vae["block_out_channels"]) - 1) if vae else 8

    # Text ------------------------------------------------------------------------------------------------------
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Conditioning:
        """(B, L_total) packed ids and mask on the device -> the batch's conditioning in the model dtype."""
        raise NotImplementedError

    def unconditional(self) -> Conditioning:
        """The pipeline's negative conditioning for an empty negative prompt: (1, ...) rows."""
        tokens = self.tokenizer.tokenize([""])
        return self.encode(self.to_device(tokens.input_ids), self.to_device(tokens.attention_mask))

    def to_device(self, array: Any) -> torch.Tensor:
        tensor = torch.as_tensor(array)
        return tensor.to(self.device)

    def token_blocks(self) -> list[TokenBlock]:
        """Where each tokenizer's caption tokens sit in `Conditioning.embeds` (explain reads significance there)."""
        return [TokenBlock("tokens", self.tokenizer.parts[self.tokenizer.main][0], 0, 1)]

    # Denoiser --------------------------------------------------------------------------------------------------
    def denoise(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        cond: Conditioning,
        module: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        """The denoiser's native output (B, C_out, H, W); module: another copy of the denoiser (float32 mitigate)."""
        raise NotImplementedError

    def scored_output(
        self, output: torch.Tensor, sample: torch.Tensor, timestep: torch.Tensor
    ) -> torch.Tensor:
        """The tensor whose cond - uncond difference is scored, (B, C, H, W)."""
        raise NotImplementedError

    def why_no_shared_prefix(self) -> str | None:
        """None where the UNet head before the first cross-attention is caption-independent (shared_prefix)."""
        return f"the {self.layout.denoiser} of a {self.layout.pipeline_classes[0]} is not a UNet"


class StableDiffusionFamily(ModelFamily):
    """SD 1.x / 2.x: the paper's metric, unchanged (scores and fingerprints of existing models stay bitwise)."""

    layout = layouts.SD
    scored = "eps_c - eps_u (v-prediction converted to eps)"
    unconditional_rule = 'E("")'
    first_step = "DDIM-50 t1 from its scheduler config (981 for SD v1.x)"
    status = "the paper's metric"
    # The paper's detection run.
    guidance_scale = magnitude.GUIDANCE_SCALE

    def __init__(
        self, components: Any, device: torch.device, dtype: torch.dtype, score_sigma: float | None = None
    ):
        super().__init__(components, device, dtype, score_sigma)
        self.text_encoder = components.text_encoder
        self.use_attention_mask = bool(getattr(self.text_encoder.config, "use_attention_mask", False))
        # Replaced by a CUDA-graph runner in Scorer.optimize_for_cuda.
        self.text_forward = self.eager_text_encoder

    def eager_text_encoder(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids)[0].to(dtype=self.dtype)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Conditioning:
        # encode_prompt passes the mask only to encoders configured to use it.
        if self.use_attention_mask and attention_mask is not None:
            hidden = self.text_encoder(input_ids, attention_mask=attention_mask)[0]
            return Conditioning(hidden.to(dtype=self.dtype))
        return Conditioning(self.text_forward(input_ids))

    def denoise(self, sample, timestep, cond, module=None):
        unet = module if module is not None else self.denoiser
        return unet(sample, timestep, encoder_hidden_states=cond.embeds, return_dict=False)[0]

    def scored_output(self, output, sample, timestep):
        return magnitude.to_epsilon(output, sample, int(timestep), self.scheduler)

    def why_no_shared_prefix(self) -> str | None:
        return None


def _clip_hidden(encoder: torch.nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate hidden states (B, L, D), output[0]) as SDXL's and SD3's encode_prompt take them."""
    output = encoder(input_ids, output_hidden_states=True)
    return output.hidden_states[-2], output[0]


class StableDiffusionXLFamily(ModelFamily):
    """SDXL: two CLIPs (penultimate layers concatenated, pooled from text_encoder_2) and SDXL's micro-conditioning."""

    layout = layouts.SDXL
    scored = "eps_c - eps_u"
    unconditional_rule = (
        'zeros for token and pooled embeddings (force_zeros_for_empty_prompt, the default), else E("")'
    )
    first_step = "DDIM-50 t1 from its scheduler config"
    status = "new: calibrate per model"
    # StableDiffusionXLPipeline.__call__'s default.
    guidance_scale = 5.0

    def __init__(
        self, components: Any, device: torch.device, dtype: torch.dtype, score_sigma: float | None = None
    ):
        super().__init__(components, device, dtype, score_sigma)
        self.text_encoders = [components.modules["text_encoder"], components.modules["text_encoder_2"]]
        self.force_zeros = bool(components.pipeline_config.get("force_zeros_for_empty_prompt", True))
        # _get_add_time_ids: original size, crop (0, 0), target size, all at the UNet's default sample size.
        _, height, width = self.latent_shape
        pixels = [height * self.vae_scale_factor, width * self.vae_scale_factor]
        self.add_time_ids = torch.tensor([[*pixels, 0, 0, *pixels]], dtype=dtype, device=device)

    def encode(self, input_ids, attention_mask):
        hidden, pooled = [], None
        for encoder, ids in zip(self.text_encoders, self.tokenizer.split(input_ids), strict=True):
            states, first = _clip_hidden(encoder, ids)
            hidden.append(states)
            # encode_prompt keeps the pooled output of the encoder with a projection (output[0] of rank 2).
            if pooled is None and first.ndim == 2:
                pooled = first
        return Conditioning(torch.cat(hidden, dim=-1).to(self.dtype), pooled.to(self.dtype))

    def unconditional(self) -> Conditioning:
        if not self.force_zeros:
            return super().unconditional()
        cond = super().unconditional()
        return Conditioning(torch.zeros_like(cond.embeds), torch.zeros_like(cond.pooled))

    def denoise(self, sample, timestep, cond, module=None):
        unet = module if module is not None else self.denoiser
        batch = sample.shape[0]
        added = {
            "text_embeds": cond.pooled.to(sample.dtype),
            "time_ids": self.add_time_ids.to(sample.dtype).expand(batch, -1),
        }
        return unet(
            sample, timestep, encoder_hidden_states=cond.embeds, added_cond_kwargs=added, return_dict=False
        )[0]

    def scored_output(self, output, sample, timestep):
        return magnitude.to_epsilon(output, sample, int(timestep), self.scheduler)

    def why_no_shared_prefix(self) -> str | None:
        return "SDXL's text_time embedding feeds the pooled text into every ResNet"


class StableDiffusion3Family(ModelFamily):
    """SD3 / SD3.5: rectified flow, MMDiT; both CLIPs and T5 as encode_prompt builds them; the velocity is scored."""

    layout = layouts.SD3
    scored = (
        "v_c - v_u (at sigma = 1 the eps-difference is identically 0; the v-difference equals -delta x0-hat)"
    )
    unconditional_rule = '"" through all encoders, as the pipeline does'
    first_step = (
        "sigma = 1 (t = 1000), the flow-matching Euler sampler's first step; score_sigma for a fixed one"
    )
    status = "new: calibrate per model"
    # StableDiffusion3Pipeline.__call__'s default.
    guidance_scale = 7.0

    def __init__(
        self, components: Any, device: torch.device, dtype: torch.dtype, score_sigma: float | None = None
    ):
        super().__init__(components, device, dtype, score_sigma)
        self.clip_encoders = [components.modules["text_encoder"], components.modules["text_encoder_2"]]
        self.t5 = components.modules.get("text_encoder_3")
        self.joint_dim = int(self.denoiser.config.joint_attention_dim)
        self.t5_length = layouts.SD3.tokenizers[2].max_length

    def build_scheduler(self, scheduler_config):
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", None):
            # StableDiffusion3Pipeline.__call__: mu from the image's sequence length (calculate_shift).
            _, height, width = self.latent_shape
            patch = int(self.denoiser.config.patch_size)
            config = scheduler.config
            base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
            base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.16)
            slope = (max_shift - base_shift) / (max_len - base_len)
            kwargs["mu"] = (height // patch) * (width // patch) * slope + base_shift - slope * base_len
        scheduler.set_timesteps(magnitude.NUM_INFERENCE_STEPS, **kwargs)
        # The trajectory's noise levels, sigma_0 = 1 (x_T) down to 0; `step` walks them.
        self.sigmas = scheduler.sigmas.cpu().float()
        return scheduler

    def score_at_sigma(self, sigma):
        # One CFG Euler step from x_T (sigma 1) straight to sigma, scored there; later steps (steps > 1) go on down
        # the sampler's own sigmas below it. bench/detection_flow.py measured this quantity (BENCHMARKS.md §3b).
        below = self.sigmas[self.sigmas < sigma]
        self.sigmas = torch.cat([torch.tensor([1.0, sigma], dtype=torch.float32), below])
        self.timesteps = self.sigmas[:-1] * float(self.scheduler.config.num_train_timesteps)
        self.lead_in_steps = 1

    def step(self, guided, index, sample):
        # FlowMatchEulerDiscreteScheduler.step without its step counter: x + (sigma_next - sigma) * v in float32.
        delta = float(self.sigmas[index + 1] - self.sigmas[index])
        return (sample.float() + delta * guided.float()).to(guided.dtype)

    def encode(self, input_ids, attention_mask):
        blocks = self.tokenizer.split(input_ids)
        hidden, pooled = [], []
        for encoder, ids in zip(self.clip_encoders, blocks[:2], strict=True):
            states, first = _clip_hidden(encoder, ids)
            hidden.append(states)
            pooled.append(first)
        clip = torch.cat(hidden, dim=-1).to(self.dtype)
        batch = input_ids.shape[0]
        if self.t5 is None:
            # _get_t5_prompt_embeds without text_encoder_3: zeros of the joint attention width.
            t5 = torch.zeros(batch, self.t5_length, self.joint_dim, device=self.device, dtype=self.dtype)
        else:
            t5 = self.t5(blocks[2])[0].to(self.dtype)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return Conditioning(torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1).to(self.dtype))

    def token_blocks(self) -> list[TokenBlock]:
        blocks = [TokenBlock("clip", "tokenizer", 0, 1)]
        if self.t5 is not None:
            clip_rows = self.tokenizer.widths[0]
            blocks.append(TokenBlock("t5", "tokenizer_3", clip_rows, 0))
        return blocks

    def denoise(self, sample, timestep, cond, module=None):
        transformer = module if module is not None else self.denoiser
        timesteps = torch.as_tensor(timestep, device=sample.device).expand(sample.shape[0])
        return transformer(
            hidden_states=sample,
            timestep=timesteps,
            encoder_hidden_states=cond.embeds,
            pooled_projections=cond.pooled,
            return_dict=False,
        )[0]

    def scored_output(self, output, sample, timestep):
        return output


class PixArtFamily(ModelFamily):
    """PixArt-Sigma / -Alpha: a DiT with T5 (its attention mask), learned sigma; captions scored as written."""

    layout = layouts.PIXART_SIGMA
    scored = "eps_c - eps_u on the first C output channels (learned sigma: the variance half dropped)"
    unconditional_rule = 'T5("") with its mask, as encode_prompt(negative_prompt="") does'
    first_step = "DDIM-50 t1 from its scheduler config"
    status = "new: calibrate per model"
    # PixArtSigmaPipeline.__call__'s default.
    guidance_scale = 4.5

    def __init__(
        self, components: Any, device: torch.device, dtype: torch.dtype, score_sigma: float | None = None
    ):
        super().__init__(components, device, dtype, score_sigma)
        self.text_encoder = components.text_encoder
        latent_channels = self.latent_shape[0]
        self.learned_sigma = int(self.denoiser.config.out_channels) // 2 == latent_channels
        self.added_cond = self.micro_conditions()

    def micro_conditions(self) -> dict[str, torch.Tensor | None]:
        """added_cond_kwargs of the pipeline: PixArt-Alpha's 1024px model (sample_size 128) takes resolution and
        aspect ratio; the others take none.
        """
        if self.layout is layouts.PIXART_SIGMA or int(self.denoiser.config.sample_size) != 128:
            return {"resolution": None, "aspect_ratio": None}
        _, height, width = self.latent_shape
        pixels = torch.tensor(
            [[height * self.vae_scale_factor, width * self.vae_scale_factor]], dtype=self.dtype
        )
        ratio = torch.tensor([[float(height / width)]], dtype=self.dtype)
        return {"resolution": pixels.to(self.device), "aspect_ratio": ratio.to(self.device)}

    def encode(self, input_ids, attention_mask):
        hidden = self.text_encoder(input_ids, attention_mask=attention_mask)[0]
        return Conditioning(hidden.to(self.dtype), mask=attention_mask)

    def token_blocks(self) -> list[TokenBlock]:
        return [TokenBlock("tokens", "tokenizer", 0, 0)]

    def denoise(self, sample, timestep, cond, module=None):
        transformer = module if module is not None else self.denoiser
        batch = sample.shape[0]
        added = {
            key: None if value is None else value.to(sample.dtype).expand(batch, -1)
            for key, value in self.added_cond.items()
        }
        timesteps = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(batch)
        return transformer(
            sample,
            encoder_hidden_states=cond.embeds,
            encoder_attention_mask=cond.mask,
            timestep=timesteps,
            added_cond_kwargs=added,
            return_dict=False,
        )[0]

    def sampler_output(self, output):
        return output.chunk(2, dim=1)[0] if self.learned_sigma else output

    def scored_output(self, output, sample, timestep):
        return magnitude.to_epsilon(self.sampler_output(output), sample, int(timestep), self.scheduler)


class PixArtAlphaFamily(PixArtFamily):
    layout = layouts.PIXART_ALPHA


FAMILIES: dict[str, type[ModelFamily]] = {
    cls.layout.name: cls
    for cls in (
        StableDiffusionFamily,
        StableDiffusionXLFamily,
        StableDiffusion3Family,
        PixArtFamily,
        PixArtAlphaFamily,
    )
}


def check_score_sigma(sigma: float) -> float:
    if isinstance(sigma, bool) or not isinstance(sigma, int | float) or not 0.0 < float(sigma) <= 1.0:
        raise ConfigError(f"score_sigma must be a number in (0, 1], got {sigma!r}; e.g. --score-sigma 0.94.")
    return float(sigma)


def build_family(
    components: Any, device: torch.device, dtype: torch.dtype, score_sigma: float | None = None
) -> ModelFamily:
    """The family of `components`; score_sigma (flow matching only): score at that noise level, see score_at_sigma."""
    if components.family not in FAMILIES:
        raise ConfigError(f"unknown model family {components.family!r}; known: {', '.join(FAMILIES)}.")
    return FAMILIES[components.family](components, device, dtype, score_sigma)


__all__ = [
    "FAMILIES",
    "Conditioning",
    "ModelFamily",
    "TokenBlock",
    "build_family",
]
