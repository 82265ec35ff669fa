"""The one module that reads torch's internals: its self-test passes on the installed torch, and fails loudly
(naming the pattern and the torch version) when a pattern stops matching."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import mtlzoo
from mtlzoo.engine import internals
from mtlzoo.engine.internals import TorchInternalsError, check_internals

PACKAGE = Path(mtlzoo.__file__).parent


def test_every_pattern_matches_the_installed_torch() -> None:
    check_internals()


@pytest.mark.parametrize(("attribute", "broken", "pattern"), [
    ("_VIEWS", frozenset(), "reshape nodes"),
    ("_PASS_THROUGH", frozenset(), "AddmmBackward0._saved_mat1"),
    ("_MODULE_HOOKS", ("_no_such_hooks",), "nn.Module._no_such_hooks"),
])
def test_a_pattern_that_stops_matching_fails_loudly(attribute: str, broken: object, pattern: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch whose graph no longer looks as the engine expects, simulated by breaking one expectation."""
    monkeypatch.setattr(internals, attribute, broken)
    with pytest.raises(TorchInternalsError, match=re.escape(pattern)) as error:
        check_internals()
    assert torch.__version__ in str(error.value)


def test_a_version_counter_that_does_not_move_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(internals, "version_sum", lambda tensors: 0)
    with pytest.raises(TorchInternalsError, match=r"Tensor\._version.*" + re.escape(torch.__version__)):
        check_internals()


def test_a_parameter_walk_that_differs_from_parameters_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine lists the parameters from the modules' dicts (parameters_of); a torch whose modules keep them
    elsewhere, simulated by a walk that drops the children, is caught by the self-test."""
    monkeypatch.setattr(internals, "parameters_of", lambda module: list(module._parameters.values()))
    with pytest.raises(TorchInternalsError, match=r"_parameters and _modules.*" + re.escape(torch.__version__)):
        check_internals()


def test_the_parameter_walk_is_parameters_on_shared_lazy_and_parametrized_modules() -> None:
    """The same tensors in the same order as Module.parameters(): a parameter shared by two modules and a module
    held twice listed once, an absent bias skipped, lazy and parametrized modules (their originals)."""
    from torch.nn.utils import parametrizations
    shared = nn.Linear(2, 2)
    models = [nn.Sequential(nn.Linear(3, 2, bias=False), shared, nn.ReLU(), shared),
              nn.Sequential(nn.Linear(3, 4), nn.LazyLinear(2)),
              parametrizations.orthogonal(nn.Linear(4, 4)),
              nn.ModuleDict({"a": nn.Linear(2, 1), "b": nn.ModuleList([nn.Conv2d(1, 2, 3), shared])})]
    models[2].bias.requires_grad_(False)
    for model in models:
        assert [id(p) for p in internals.parameters_of(model)] == [id(p) for p in model.parameters()]
    assert mtlzoo.structure.trainable_parameters(models[2]) == [models[2].parametrizations.weight.original]


INTERNALS = {
    "a module's parameter and child dicts": r"\._(parameters|modules)\b",
    "saved tensors of a node": r"\._saved_\w",
    "a node's inputs": r"\.next_functions\b",
    "a node's class name": r"[\'\"]\w+Backward\d[\'\"]",
    "a tensor's node": r"\.grad_fn\b",
    "a module's hook dicts": r"\._(forward|backward)(_pre)?_hooks\b",
    "torch's process-wide hook dicts": r"\b_global_(forward|backward)",
    "a version counter": r"\._version\b",
    "autograd's engine": r"_execution_engine",
    "torch.utils.weak": r"torch\.utils\.weak",
}


def test_no_other_module_reads_torch_internals() -> None:
    """Issue 18: every read of autograd-graph or module internals lives in mtlzoo/engine/internals.py."""
    found = {(str(path.relative_to(PACKAGE)), what) for path in sorted(PACKAGE.rglob("*.py"))
             if path.name != "internals.py" for what, pattern in INTERNALS.items()
             if re.search(pattern, path.read_text())}
    assert found == set()
    assert re.search(INTERNALS["a node's class name"], "name == 'AddmmBackward0'")  # the patterns do match


def test_the_linear_last_layer_is_read_through_a_reshape_and_autocast() -> None:
    """linear_output: an nn.Linear on (batch, tokens, features), also under CPU autocast (a cast of W)."""
    layer = nn.Linear(4, 3)
    h = torch.randn(2, 5, 4)
    found = internals.linear_output(layer(h))
    assert found is not None and found.weight is layer.weight and found.bias is layer.bias
    torch.testing.assert_close(found.input, h.reshape(10, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        found = internals.linear_output(layer(h))
    assert found is not None and found.weight is layer.weight
