"""CUDA-graph replay of fixed-shape forwards (text encoder, first-step denoiser). torch only.

A graph is captured once per actor for one batch shape; a smaller batch is copied into the first rows of the
static inputs and only those rows of the output are returned, so padding never reaches a score.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

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


class GraphedFirstStep:
    """A Scorer denoiser: graph replay at the first timestep, eager for every other call.

    denoise: the family's `denoise(sample, timestep, conditioning)`; the conditioning's tensors (embeddings, and
    pooled text or a mask where the family has them) are static inputs of the graph beside the sample.
    """

    def __init__(
        self,
        denoise: Callable[..., torch.Tensor],
        first_timestep: torch.Tensor,
        example_sample: torch.Tensor,
        example_cond: Any,
    ):
        self.denoise = denoise
        self.first_timestep = float(first_timestep)
        self.template = example_cond
        static_t = torch.as_tensor(first_timestep, device=example_sample.device)

        def first_step(sample: torch.Tensor, *cond_tensors: torch.Tensor) -> torch.Tensor:
            return denoise(sample, static_t, self.template.with_tensors(list(cond_tensors)))

        self.runner = CudaGraphRunner(first_step, [example_sample, *example_cond.tensors()])

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, cond: Any) -> torch.Tensor:
        if float(timestep) == self.first_timestep:
            return self.runner(sample, *cond.tensors())
        return self.denoise(sample, timestep, cond)
