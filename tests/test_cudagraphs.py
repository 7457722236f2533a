"""CUDA graph replay of a step (``mimicshield.cudagraphs``).

No GPU runs these tests: a stand-in records a step by keeping the function and "replays" it by
running it again into the recorded output tensor, reading the same buffers a real graph reads.
That checks what can go wrong outside the driver: a per-step tensor not copied in, a result
overwritten by the next replay, a stale graph kept after the shape changed. Whether the real
capture matches eager steps is checked on a GPU (``scripts/gpu_bench.sh``).
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from mimicshield import protector as protector_module
from mimicshield.bench import architecture, bench_images, build_engine_model
from mimicshield.cudagraphs import GraphedDirection, can_use_cuda_graphs
from mimicshield.methods import METHODS, StepInputs
from mimicshield.protector import Protector


class RerunGraphs:
    """Stands in for ``torch.cuda`` graph recording."""

    def __init__(self) -> None:
        self.records = 0
        self.devices: list[torch.device] = []  # streams must be made on the step's own device

    def warm_up(self, run, device):
        self.devices.append(device)
        return run()

    def record(self, run, device):
        self.records += 1
        self.devices.append(device)
        out = run()
        return SimpleNamespace(replay=lambda: out.copy_(run())), out


class FailingGraphs(RerunGraphs):
    def record(self, run, device):
        raise RuntimeError("operation not permitted when stream is capturing")


@pytest.fixture(scope="module")
def model():
    return build_engine_model(architecture(tiny=True), torch.device("cpu"), torch.float32)


def step_inputs(model, x, seed: int, fixed: dict) -> StepInputs:
    generator = torch.Generator().manual_seed(seed)
    shape = (x.shape[0], *model.latent_shape(*x.shape[-2:]))
    return StepInputs(
        t=torch.randint(0, model.num_train_timesteps, (x.shape[0],), generator=generator),
        noise=torch.randn(shape, generator=generator),
        posterior_noise=torch.randn(shape, generator=generator),
        **fixed,
    )


@pytest.mark.parametrize("name", ["sds-", "advdm+", "mist", "photoguard", "encoder"])
def test_replays_give_each_steps_own_direction(name, model, one_thread):
    x0 = bench_images(2, 32, seed=1) * 2 - 1
    fixed = {"cond": model.condition("a photo", 2, 32, 32)}
    with torch.no_grad():
        fixed["target_latent"] = model.encode(x0.flip(0))
        fixed["source_latent"] = model.encode(x0)
    direction = METHODS[name].direction
    graphs = RerunGraphs()
    graphed = GraphedDirection(direction, graph_api=graphs)
    results = []
    for step in range(4):
        x = (x0 + 0.05 * step).clamp(-1, 1)
        inputs = step_inputs(model, x, seed=step, fixed=fixed)
        got = graphed(model, x, inputs)
        results.append(got)
        torch.testing.assert_close(got, direction(model, x, inputs), rtol=1e-5, atol=1e-7)
    assert graphs.records == 1
    assert graphs.devices == [x0.device, x0.device]  # warm-up and capture on the step's device
    assert not torch.equal(results[1], results[2])  # each step kept its own result


def test_a_new_shape_or_new_fixed_inputs_record_a_new_graph(model, one_thread):
    graphs = RerunGraphs()
    graphed = GraphedDirection(METHODS["sds-"].direction, graph_api=graphs)
    conditions = {size: model.condition("a photo", 1, size, size) for size in (32, 64)}
    for size in (32, 32, 64, 64):
        x = bench_images(1, size, seed=2) * 2 - 1
        graphed(model, x, step_inputs(model, x, seed=3, fixed={"cond": conditions[size]}))
    assert graphs.records == 2
    # the graph reads the conditioning where it was recorded: a new object means a new graph
    graphed(
        model, x, step_inputs(model, x, seed=3, fixed={"cond": model.condition("a", 1, 64, 64)})
    )
    assert graphs.records == 3


def test_a_failed_capture_falls_back_to_eager_steps(model, one_thread, caplog):
    direction = METHODS["sds-"].direction
    graphed = GraphedDirection(direction, graph_api=FailingGraphs())
    x = bench_images(1, 32, seed=4) * 2 - 1
    inputs = step_inputs(model, x, seed=5, fixed={"cond": model.condition("a photo", 1, 32, 32)})
    with caplog.at_level(logging.WARNING):
        got = graphed(model, x, inputs)
    assert graphed.failed and "CUDA graphs are off" in caplog.text
    torch.testing.assert_close(got, direction(model, x, inputs))
    torch.testing.assert_close(graphed(model, x, inputs), direction(model, x, inputs))
    assert graphed.replays == 0  # what the bench and check_reproducibility.py look at


def test_protector_with_cuda_graphs_protects_the_same(model, monkeypatch, one_thread):
    images = bench_images(2, 32, seed=6)
    eager = Protector(model, "sds-", steps=3)(images)
    graphs = RerunGraphs()
    monkeypatch.setattr(protector_module, "can_use_cuda_graphs", lambda *a, **k: True)
    monkeypatch.setattr(
        protector_module,
        "GraphedDirection",
        lambda direction: GraphedDirection(direction, graph_api=graphs),
    )
    protector = Protector(model, "sds-", steps=3, cuda_graphs=True)
    replayed = protector(images)
    assert graphs.records == 1
    assert protector.graph_replays == 2  # the first step ran eagerly and was recorded
    torch.testing.assert_close(replayed, eager, rtol=0, atol=0)


def test_cuda_graphs_only_where_every_step_is_the_same_computation():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert can_use_cuda_graphs(cuda, ensemble=False, robust=False)
    assert not can_use_cuda_graphs(cpu, ensemble=False, robust=False)
    assert not can_use_cuda_graphs(cuda, ensemble=True, robust=False)
    assert not can_use_cuda_graphs(cuda, ensemble=False, robust=True)
