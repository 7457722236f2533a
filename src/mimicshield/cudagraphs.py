"""One protection step, recorded once as a CUDA graph and replayed every step after.

At batch 1 a step is launch-bound: the encoder forward and backward and the UNet forward issue
thousands of small kernels, and the GPU waits for the CPU to launch each one (on an H200 the bare
networks take 52.6 ms at batch 1 but 16.8 ms per image at batch 8). A CUDA graph records the
step's kernels once and replays them with a single launch, with no compilation (unlike
``torch.compile(mode="reduce-overhead")``, which needs a minute or more before the first step).

A graph replays the memory addresses it recorded, so every tensor that changes between steps
(the image, the timestep, the noise draws) is copied into a buffer the graph owns before each
replay, and the tensors fixed for the run (the text conditioning, the target latent) must stay
the same objects. Anything the capture cannot handle falls back to the eager step, with a
warning, rather than failing the job.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import fields, replace

import torch
from torch import Tensor

from .methods import StepInputs

logger = logging.getLogger(__name__)

# What changes from one step to the next; every other StepInputs field is fixed for the run.
PER_STEP_FIELDS = ("t", "noise", "posterior_noise")


class GraphedDirection:
    """``direction(model, x, inputs)``, replayed from a CUDA graph after its first call.

    The first call with a new model, shape or set of fixed inputs runs the step eagerly (its
    result is returned: nothing is wasted; it also warms up cuDNN and the allocator) and then
    records the graph; later calls copy their tensors in and replay it.

    Args:
        direction: a step direction of :mod:`mimicshield.methods`, ``(model, x, inputs)``.
        graph_api: what records and replays; ``torch.cuda`` by default. Tests pass a stand-in.
    """

    def __init__(self, direction: Callable[..., Tensor], graph_api=None) -> None:
        self.direction = direction
        self.graph_api = graph_api if graph_api is not None else _TorchCudaGraphs()
        self.failed = False
        self.replays = 0  # steps served by a graph: 0 after a run means it fell back to eager
        self._key: tuple | None = None
        self._graph = None
        self._static_x: Tensor | None = None
        self._static_inputs: StepInputs | None = None
        self._static_out: Tensor | None = None

    def __call__(self, model, x: Tensor, inputs: StepInputs) -> Tensor:
        if self.failed:
            return self.direction(model, x, inputs)
        key = _key(model, x, inputs)
        if key != self._key:
            return self._record(key, model, x, inputs)
        self._static_x.copy_(x)
        for name in PER_STEP_FIELDS:
            value = getattr(inputs, name)
            if value is not None:
                getattr(self._static_inputs, name).copy_(value)
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
            self._graph.replay()
        self.replays += 1
        return self._static_out.clone()

    def _record(self, key: tuple, model, x: Tensor, inputs: StepInputs) -> Tensor:
        """Run this step eagerly for its result, then record it into a graph for the next."""
        self._key, self._graph = None, None
        static_x = x.detach().clone()
        copies = {name: getattr(inputs, name) for name in PER_STEP_FIELDS}
        copies = {name: value.clone() for name, value in copies.items() if value is not None}
        static_inputs = replace(inputs, **copies)

        def step() -> Tensor:
            return self.direction(model, static_x, static_inputs)

        # a real error in the warm-up is the step's own: raise it
        result = self.graph_api.warm_up(step, x.device)
        try:
            graph, static_out = self.graph_api.record(step, x.device)
        except RuntimeError as error:  # includes running out of memory for the graph's pool
            self.failed = True
            logger.warning("CUDA graphs are off for this run (%s); steps run eagerly.", error)
            return result
        self._key, self._graph = key, graph
        self._static_x, self._static_inputs, self._static_out = static_x, static_inputs, static_out
        return result


def _key(model, x: Tensor, inputs: StepInputs) -> tuple:
    """What a recorded graph is valid for: the model, every tensor's shape and dtype, and the
    identity of the inputs fixed for the run (a graph reads them from where they were)."""
    parts: list = [id(model), tuple(x.shape), x.dtype, x.device]
    for field in fields(StepInputs):
        value = getattr(inputs, field.name)
        if field.name in PER_STEP_FIELDS:
            parts.append(None if value is None else (tuple(value.shape), value.dtype))
        else:
            parts.append(id(value))
    return tuple(parts)


class _TorchCudaGraphs:
    """CUDA graph recording on ``torch.cuda``, as its documentation prescribes."""

    # Streams belong to a device: made without one they are the *current* device's, so with
    # --device cuda:1 (cuda:0 current) the capture would record cuda:0's stream while the work
    # ran on cuda:1, and every replay would return the first step's result. Hence the device
    # context around both.

    def warm_up(self, run: Callable[[], Tensor], device: torch.device) -> Tensor:
        """Run eagerly once on a side stream (capture requires the warm-up off the main one)."""
        with torch.cuda.device(device):
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                result = run()
            main = torch.cuda.current_stream(device)
            main.wait_stream(side)
            result.record_stream(main)  # made on the side stream, used on the main one
        return result

    def record(
        self, run: Callable[[], Tensor], device: torch.device
    ) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        """Record ``run``'s kernels without executing them; returns the graph and the tensor
        that each ``graph.replay()`` fills."""
        with torch.cuda.device(device):
            # The graph gets a memory pool of its own: hand the warm-up's cached blocks back
            # first, so the step's activations are not held twice.
            torch.cuda.empty_cache()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=torch.cuda.Stream(device)):
                out = run()
        return graph, out


def can_use_cuda_graphs(device: torch.device, *, ensemble: bool, robust: bool) -> bool:
    """CUDA graphs need a CUDA device and the same computation every step: one model (an
    ensemble's models could each have one, not done yet) and no random transforms (EOT)."""
    return device.type == "cuda" and not ensemble and not robust
