"""Issue 19, item 23: the functional face (losses, shared representation, shared parameters) for models that are
not a backbone plus heads; on a hard-sharing model it takes the wrapper's step exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mtlzoo
from mtlzoo.engine import backward
from mtlzoo.errors import InvalidModelError
from tests.helpers import batch, mse_losses, small_model

STRATEGIES = [("ls", {}), ("uw", {}), ("dwa", {}), ("upgrad", {}), ("mgda", {"weighted_heads": False}), ("pcgrad", {}),
              ("imtl_g", {}), ("graddrop", {}), ("gradnorm", {"alpha": 1.5}), ("cagrad", {})]


@pytest.mark.parametrize(("name", "options"), STRATEGIES, ids=[name for name, _ in STRATEGIES])
def test_on_a_hard_sharing_model_it_takes_the_wrappers_step(name: str, options: dict) -> None:
    """Reference: MTLWrapper.backward on a copy of the model, the strategy built from the same seed (MGDA with its
    heads unweighted: the functional face leaves weighted_heads aside, see its docstring)."""
    torch.manual_seed(0)
    model = small_model()
    twin = copy.deepcopy(model)
    x, targets = batch()
    torch.manual_seed(1)
    mtl = mtlzoo.MTLWrapper(twin, name, **options)
    torch.manual_seed(1)
    strategy = mtlzoo.create(name, num_tasks=3, **options)
    mtl.backward(mse_losses(mtl(x), targets))
    features = model.backbone(x)
    used = backward(strategy, mse_losses([head(features) for head in model.heads], targets), features,
                    model.backbone)
    for ours, theirs in zip([*model.parameters(), *strategy.parameters()], [*twin.parameters(),
                                                                           *mtl.strategy.parameters()]):
        torch.testing.assert_close(ours.grad, theirs.grad)
    assert mtl.last_step is not None
    torch.testing.assert_close(used.loss_weights, mtl.last_step.loss_weights)
    assert strategy.micro_batch == 1


class TaskAttention(nn.Module):
    """Not hard sharing: a shared trunk, then per task an attention gate over the trunk's features and a head."""

    def __init__(self, num_tasks: int = 3) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh())
        self.gates = nn.ModuleList([nn.Linear(8, 8) for _ in range(num_tasks)])
        self.heads = nn.ModuleList([nn.Linear(8, 1) for _ in range(num_tasks)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        features = self.trunk(x)
        return features, [head(features * torch.sigmoid(gate(features))) for gate, head in zip(self.gates, self.heads)]


def test_a_model_with_per_task_attention_trains_by_its_definition() -> None:
    """The trunk gets sum_k c_k dL_k/dθ with the reported c; each gate and head the gradient of its own loss
    (w = 1 under a surgery strategy). Reference: plain per-task autograd on a copy."""
    torch.manual_seed(0)
    model = TaskAttention()
    reference = copy.deepcopy(model)
    x, targets = batch()
    features, predictions = model(x)
    used = backward(mtlzoo.create("upgrad", num_tasks=3), mse_losses(predictions, targets), features, model.trunk)
    assert used.coefficients is not None
    _, plain = reference(x)
    losses = mse_losses(plain, targets)
    trunk = list(reference.trunk.parameters())
    per_task = [torch.autograd.grad(loss, trunk, retain_graph=True) for loss in losses]
    for index, param in enumerate(model.trunk.parameters()):
        torch.testing.assert_close(param.grad, sum(c * g[index] for c, g in zip(used.coefficients, per_task)))
    for k, loss in enumerate(losses):
        own = [*reference.gates[k].parameters(), *reference.heads[k].parameters()]
        for ours, theirs in zip([*model.gates[k].parameters(), *model.heads[k].parameters()],
                                torch.autograd.grad(loss, own, retain_graph=True)):
            torch.testing.assert_close(ours.grad, theirs)


def test_the_shared_parameters_are_found_from_the_features_when_not_given() -> None:
    torch.manual_seed(0)
    model = TaskAttention()
    twin = copy.deepcopy(model)
    x, targets = batch()
    for net, shared in ((model, None), (twin, twin.trunk)):
        features, predictions = net(x)
        backward(mtlzoo.create("mgda", num_tasks=3), mse_losses(predictions, targets), features, shared)
    for ours, theirs in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad)


def test_a_strategy_that_adapts_the_representation_is_sent_to_the_wrapper() -> None:
    model = TaskAttention()
    x, targets = batch()
    features, predictions = model(x)
    with pytest.raises(InvalidModelError, match="MTLWrapper"):
        backward(mtlzoo.create("rotograd", num_tasks=3, rotation_shape=8), mse_losses(predictions, targets),
                 features)
    assert all(p.grad is None for p in model.parameters())
