"""Checkpoints of mtlzoo 0.1.0 load into the composites (RotoGrad family and IMTL) and resume exactly.

``data/checkpoints_0.1.0.pt`` was written by the code of mtlzoo 0.1.0 (commit f08efb1; the strategies'
files were unchanged at 4f727cc), where each of these strategies was one module: for each case a whole
``MTLWrapper``'s ``state_dict()`` after three optimizer steps (SGD, lr 0.05, ``tests.helpers``' model and
batch, ``torch.manual_seed(0)``), the outputs of the next forward and the gradients of the next backward::

    mtl = mtlzoo.MTLWrapper(small_model(), name, **kwargs); x, targets = batch(); mtl(x)
    for _ in range(3): opt.zero_grad(); mtl.backward(mse_losses(mtl(x), targets)); mtl.step(opt)
    state = mtl.state_dict(); opt.zero_grad(); mtl.backward(mse_losses(mtl(x), targets)); grads = ...
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

import mtlzoo
from mtlzoo.errors import CheckpointMismatchError
from tests.helpers import batch, mse_losses, small_model

SAVED: dict[str, Any] = torch.load(Path(__file__).parent / "data" / "checkpoints_0.1.0.pt")


def new_name(name: str) -> str:
    """A parameter's name in the parts' layout."""
    for old, new in (("strategy.bank.", "strategy.adapter.bank."), ("strategy.weight_logits", "strategy.aggregator."
                     "weight_logits"), ("strategy.loss_scales.", "strategy.weighting.")):
        if name.startswith(old):
            return new + name[len(old):]
    return name


@pytest.mark.parametrize("case", sorted(SAVED))
def test_a_checkpoint_of_the_single_module_layout_loads_and_resumes_exactly(case: str) -> None:
    saved = SAVED[case]
    torch.manual_seed(1)  # other initial values than the checkpoint's
    mtl = mtlzoo.MTLWrapper(small_model(), saved["name"], **saved["kwargs"])
    x, targets = batch()
    mtl(x)
    mtl.load_state_dict(saved["state_dict"])
    with torch.no_grad():
        for ours, theirs in zip(mtl(x), saved["outputs"]):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    mtl.backward(mse_losses(mtl(x), targets))
    grads = {name: p.grad for name, p in mtl.named_parameters() if p.grad is not None}
    assert len(grads) == len(saved["grads"])
    for name, theirs in saved["grads"].items():
        # IMTL-L's scales learn from autograd through its scalarization now, 0.1.0 from a closed form: the same
        # exp(s) L - 1, whose O(1) terms round differently in float32 (a few units of the last place)
        exact = "loss_scales" not in name
        eps = torch.finfo(theirs.dtype).eps
        torch.testing.assert_close(grads[new_name(name)], theirs, rtol=0 if exact else 4 * eps,
                                   atol=0 if exact else 4 * eps * float(theirs.abs().max() + 1), msg=name)
    if saved["name"] != "imtl":
        assert mtl.strategy.step == 3
        torch.testing.assert_close(mtl.strategy.initial_losses, saved["state_dict"]["strategy.initial_losses"])
    resaved = mtl.state_dict()
    assert not any(key.startswith("strategy.") and key.count(".") == 1 and key != "strategy._extra_state"
                   for key in resaved)  # saved again in the parts' layout


def test_rotograd_norm_gives_the_reference_losses_to_both_parts() -> None:
    saved = SAVED["rotograd_norm"]
    mtl = mtlzoo.MTLWrapper(small_model(), "rotograd_norm", **saved["kwargs"])
    mtl.load_state_dict(saved["state_dict"])
    reference = saved["state_dict"]["strategy.initial_losses"]
    torch.testing.assert_close(mtl.strategy.adapter.initial_losses, reference, rtol=0, atol=0)
    torch.testing.assert_close(mtl.strategy.aggregator.initial_losses, reference, rtol=0, atol=0)
    assert mtl.strategy.aggregator.state.step == 3


def test_a_tensor_that_no_part_holds_is_refused_by_name() -> None:
    state = dict(mtlzoo.create("rotograd", num_tasks=3, rotation_shape=4).state_dict())
    state["loss_sums"] = torch.zeros(3)
    with pytest.raises(CheckpointMismatchError, match=r"'loss_sums'.*mtlzoo 0\.1\.0"):
        mtlzoo.create("rotograd", num_tasks=3, rotation_shape=4).load_state_dict(state)


def test_a_refused_checkpoint_leaves_the_wrapper_unchanged() -> None:
    torch.manual_seed(0)
    mtl = mtlzoo.MTLWrapper(small_model(), "rotograd", rotation_shape=4)
    state = copy.deepcopy(mtl.state_dict())
    state["backbone.0.weight"] += 1
    state["strategy.loss_sums"] = torch.zeros(3)
    before = copy.deepcopy(mtl.state_dict())
    with pytest.raises(CheckpointMismatchError, match="loss_sums"):
        mtl.load_state_dict(state)
    for key, value in mtl.state_dict().items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(value, before[key], rtol=0, atol=0, equal_nan=True, msg=key)
    assert "strategy.loss_sums" in state and "strategy.adapter.bank.matrices.0.rotation" in state  # as it was
