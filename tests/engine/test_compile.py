"""Issue 19, item 9: a compiled backbone under every strategy that reads gradients on the shared parameters, and a
compiled whole model, which the wrapper cannot use, said so."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mtlzoo
from mtlzoo.engine.internals import CompiledGraphError, check_compile_internals

ON_PARAMETERS = sorted(e.name for e in mtlzoo.list_strategies() if e.info.request.where == "parameters")
OPTIONS = {"gradnorm": {"alpha": 1.5}}
BACKEND = "aot_eager"
"""AOTAutograd's graphs (where a compiled backward lives) without code generation, so the test takes seconds."""


def models() -> tuple[mtlzoo.HardSharing, mtlzoo.HardSharing]:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 4))
    heads = [nn.Linear(4, 1) for _ in range(3)]
    eager = mtlzoo.HardSharing(copy.deepcopy(backbone), copy.deepcopy(heads))
    return eager, mtlzoo.HardSharing(torch.compile(backbone, backend=BACKEND), heads)


def test_the_compile_patterns_match_the_installed_torch() -> None:
    check_compile_internals()


def test_every_strategy_on_the_parameters_is_covered() -> None:
    expected = {"upgrad", "mgda", "nash_mtl", "cagrad", "pcgrad", "gradvac", "dualproj", "aligned_mtl", "gradnorm"}
    assert expected <= set(ON_PARAMETERS)


@pytest.mark.parametrize("name", [n for n in ON_PARAMETERS if n != "gradnorm"])
def test_a_compiled_backbone_trains_as_the_eager_one(name: str) -> None:
    """Two steps; compiled equals eager within float32 rounding of a few products (1e-5 relative)."""
    eager, compiled = models()
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(1))
    wrappers = []
    for model in (eager, compiled):
        torch.manual_seed(2)  # a stochastic strategy draws its seed at construction
        wrappers.append(mtlzoo.MTLWrapper(model, name, **OPTIONS.get(name, {})))
    for mtl in wrappers:
        optimizer = torch.optim.SGD(mtl.parameters(), lr=0.05)
        for _ in range(2):
            optimizer.zero_grad()
            mtl.backward([p.pow(2).mean() for p in mtl(x)])
            mtl.step(optimizer)
    for ours, theirs in zip(wrappers[0].model_parameters(), wrappers[1].model_parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_the_last_layer_through_a_compiled_backbone_is_refused_clearly() -> None:
    """GradNorm's last shared layer, found from the graph, is hidden in the compiled region: a clear error, and
    nothing reaches .grad (before: the weights of every layer were read as "the last layer")."""
    _, compiled = models()
    mtl = mtlzoo.MTLWrapper(compiled, "gradnorm", alpha=1.5)
    with pytest.raises(CompiledGraphError, match=r"compiled backbone.*layer="):
        mtl.backward([p.pow(2).mean() for p in mtl(torch.randn(16, 5))])
    assert all(p.grad is None for p in mtl.parameters())


def test_a_compiled_whole_model_is_warned() -> None:
    eager, _ = models()
    with pytest.warns(RuntimeWarning, match=r"compiles nothing.*torch.compile\(model.backbone\)"):
        mtlzoo.MTLWrapper(torch.compile(eager, backend=BACKEND), "ls")


def test_a_graph_with_donated_buffers_gets_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where a compiled region donated its buffers anyway (compiled before the wrapper saw it), AOTAutograd's
    refusal of the Jacobian's second backward becomes an error that says what to do; nothing reaches .grad."""
    original = torch.autograd.grad

    def refuse(*args: object, **kwargs: object) -> object:
        if kwargs.get("retain_graph") and kwargs.get("is_grads_batched"):
            raise RuntimeError("This backward function was compiled with non-empty donated buffers which requires "
                               "create_graph=False and retain_graph=False.")
        return original(*args, **kwargs)  # type: ignore[arg-type]

    eager, _ = models()
    mtl = mtlzoo.MTLWrapper(eager, "upgrad", jacobian_chunk_size=3)  # the batched backward (the CPU default loops)
    predictions = mtl(torch.randn(16, 5))
    monkeypatch.setattr(torch.autograd, "grad", refuse)
    with pytest.raises(CompiledGraphError, match=r"donated_buffer = False.*target='representation'"):
        mtl.backward([p.pow(2).mean() for p in predictions])
    assert all(p.grad is None for p in mtl.parameters())
