"""CUDA-graph replay of fixed-shape forwards (text encoder, first-step UNet). torch only.

A graph is captured once per actor for one batch shape; a smaller batch is copied into the first rows of the
static inputs and only those rows of the output are returned, so padding never reaches a score.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

logger = logging.getLogger(__name__)


class CudaGraphRunner:
    """Captures `fn(*inputs)` for inputs shaped like `example_inputs` (batch on dim 0) and replays it.

    Calls with a batch up to the captured size replay the graph; anything else runs `fn` eagerly.
    The returned tensor is a fresh copy: the static output is overwritten by the next replay.
    """

    def __init__(
        self, fn: Callable[..., torch.Tensor], example_inputs: Sequence[torch.Tensor], warmup: int = 3
    ):
        self.fn = fn
        self.batch_size = int(example_inputs[0].shape[0])
        self.static_inputs = [t.clone() for t in example_inputs]
        # Warm-up on a side stream: cuDNN/cuBLAS pick algorithms and allocate workspaces outside the capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(warmup):
                fn(*self.static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.static_output = fn(*self.static_inputs)

    def matches(self, inputs: Sequence[torch.Tensor]) -> bool:
        return len(inputs) == len(self.static_inputs) and all(
            value.shape[0] <= self.batch_size
            and value.shape[1:] == static.shape[1:]
            and value.dtype == static.dtype
            and value.device == static.device
            for value, static in zip(inputs, self.static_inputs, strict=True)
        )

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or not self.matches(inputs):
            return self.fn(*inputs)
        rows = int(inputs[0].shape[0])
        for static, value in zip(self.static_inputs, inputs, strict=True):
            static[:rows].copy_(value, non_blocking=True)
        self.graph.replay()
        return self.static_output[:rows].clone()


class GraphedFirstStepUNet:
    """A Scorer denoiser: graph replay for the first DDIM timestep, eager for every other call."""

    def __init__(
        self,
        unet: torch.nn.Module,
        first_timestep: int,
        example_sample: torch.Tensor,
        example_embeds: torch.Tensor,
    ):
        self.unet = unet
        self.first_timestep = first_timestep
        static_t = torch.tensor(first_timestep, device=example_sample.device)

        def first_step(sample: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
            return unet(sample, static_t, encoder_hidden_states=prompt_embeds, return_dict=False)[0]

        self.runner = CudaGraphRunner(first_step, [example_sample, example_embeds])

    def __call__(
        self, sample: torch.Tensor, timestep: torch.Tensor, prompt_embeds: torch.Tensor
    ) -> torch.Tensor:
        if int(timestep) == self.first_timestep:
            return self.runner(sample, prompt_embeds)
        return self.unet(sample, timestep, encoder_hidden_states=prompt_embeds, return_dict=False)[0]
