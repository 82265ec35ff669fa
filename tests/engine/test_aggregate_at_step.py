"""``MTLWrapper(aggregate_at="step")``: M micro-batches give exactly the whole batch's step (issue 19).

The reference is mtlzoo's own default step on the whole batch (one backward of the full batch's
losses, ``aggregate_at="backward"``): with the micro-batches' losses scaled by 1/M, the step-time
aggregation over the summed per-task gradients must reproduce its parameters and running state.
The default on the same micro-batches is shown to differ for a non-linear method (MGDA), so the
comparison would fail if the option changed nothing.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import mtlzoo
from mtlzoo.engine.accumulation import StepBuffer
from mtlzoo.errors import BackwardOrderError, DistributedError
from mtlzoo.strategy import hyperparameters
from tests.helpers import required_kwargs

K, SIZE, STEPS = 3, 16, 3


def _request_where(name: str) -> str:
    return mtlzoo.create(name, num_tasks=K, **required_kwargs(name)).request.where


ON_PARAMETERS = [entry.name for entry in mtlzoo.list_strategies() if _request_where(entry.name) == "parameters"]
ELSEWHERE = [entry.name for entry in mtlzoo.list_strategies() if _request_where(entry.name) != "parameters"]


def _strategy(name: str) -> mtlzoo.Strategy:
    kwargs: dict[str, Any] = required_kwargs(name)
    if "seed" in hyperparameters(mtlzoo.get_strategy(name).cls):
        kwargs["seed"] = 3  # both runs draw the same task orders
    return mtlzoo.create(name, num_tasks=K, **kwargs)


def _model(dtype: torch.dtype = torch.float64) -> mtlzoo.HardSharing:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 4))
    heads = [nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)) for _ in range(K)]
    return mtlzoo.HardSharing(backbone, heads).to(dtype)


def _data(seed: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(SIZE, 5, generator=generator, dtype=torch.float64)
    targets = torch.randn(K, SIZE, 1, generator=generator, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.5]).view(
        -1, 1, 1)
    return x.to(dtype), targets.to(dtype)


def _losses(predictions: list[torch.Tensor], targets: torch.Tensor, parts: int) -> list[torch.Tensor]:
    return [((p - t) ** 2).mean() / parts for p, t in zip(predictions, targets)]


def _train(name: str, aggregate_at: str, parts: int, steps: int = STEPS) -> mtlzoo.MTLWrapper:
    """``steps`` SGD steps on the same batches, each split into ``parts`` micro-batches (losses scaled by 1/parts);
    the strategy's other independent batches (SDMGrad, MoDo) split the same way."""
    mtl = mtlzoo.MTLWrapper(_model(), _strategy(name), aggregate_at=aggregate_at)
    optimizer = torch.optim.SGD(mtl.parameters(), lr=0.05)
    for step in range(steps):
        batches = [_data(10 * step + index) for index in range(mtl.strategy.request.batches)]
        optimizer.zero_grad()
        for part in range(parts):
            pieces = [(x.chunk(parts)[part], t.chunk(parts, dim=1)[part]) for x, t in batches]
            losses = [_losses(mtl(x), t, parts) for x, t in pieces]
            mtl.backward(losses[0], more_batches=losses[1:])
        mtl.step(optimizer)
    return mtl


def _flat(mtl: mtlzoo.MTLWrapper) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in mtl.parameters()])


def _assert_same_step(expected: mtlzoo.MTLWrapper, actual: mtlzoo.MTLWrapper) -> None:
    # float64 throughout; the solvers (MGDA's, Nash-MTL's, ...) see Gramians that differ in rounding only
    torch.testing.assert_close(_flat(actual), _flat(expected), rtol=1e-9, atol=1e-10)
    expected_state, actual_state = expected.strategy.state_dict(), actual.strategy.state_dict()
    assert expected_state.keys() == actual_state.keys()
    for key, value in expected_state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            torch.testing.assert_close(actual_state[key], value, rtol=1e-9, atol=1e-10, equal_nan=True, msg=key)
        elif isinstance(value, torch.Tensor):
            assert torch.equal(actual_state[key], value), key
        else:
            assert actual_state[key] == value, key


def test_every_strategy_on_the_parameters_is_covered() -> None:
    assert {"mgda", "upgrad", "nash_mtl", "pcgrad", "gradnorm", "db_mtl", "sdmgrad"} <= set(ON_PARAMETERS)


@pytest.mark.parametrize("name", ON_PARAMETERS)
def test_micro_batches_give_the_whole_batch_step(name: str) -> None:
    whole = _train(name, "backward", parts=1)
    accumulated = _train(name, "step", parts=2)
    _assert_same_step(whole, accumulated)
    torch.testing.assert_close(accumulated.last_step.loss_weights, whole.last_step.loss_weights, rtol=1e-9,
                               atol=1e-10, equal_nan=True)


def test_the_default_aggregates_each_micro_batch() -> None:
    """Without the option MGDA's two micro-batch steps are not the whole batch's: the test above has teeth."""
    whole = _train("mgda", "backward", parts=1)
    default = _train("mgda", "backward", parts=2)
    assert (_flat(default) - _flat(whole)).abs().max() > 1e-3


# ---------------------------------------------------------------------- what is refused
@pytest.mark.parametrize("name", ELSEWHERE)
def test_strategies_off_the_parameters_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="aggregate_at='step'.*" + type(_strategy(name)).__name__):
        mtlzoo.MTLWrapper(_model(), _strategy(name), aggregate_at="step")


def test_an_unknown_value_is_refused() -> None:
    with pytest.raises(ValueError, match="aggregate_at"):
        mtlzoo.MTLWrapper(_model(), "mgda", aggregate_at="epoch")


def test_distributed_is_refused() -> None:
    """Under torch.distributed the wrapper hands the buffer ``active=True`` (its sync is a process group's)."""
    mtl = mtlzoo.MTLWrapper(_model(), "mgda", aggregate_at="step")
    x, targets = _data(0)
    losses = _losses(mtl(x), targets, 1)
    buffer = mtl._buffer
    step_losses = mtlzoo.losses.loss_vector(losses, None, K)
    with pytest.raises(DistributedError, match="aggregate_at='backward'"):
        buffer.add(mtl.strategy, mtl._pending, mtl.heads, mtl.backbone, step_losses, [], tracker=mtl._tracker,
                   active=True, backbone_loss=None, scaler=None, retain_graph=False, chunk_size=None,
                   route=mtl._route)
    assert buffer.empty and all(p.grad is None for p in mtl.parameters())


# ---------------------------------------------------------------------- the edges of a step
def _micro_batches(mtl: mtlzoo.MTLWrapper, seed: int, parts: int = 2, absent: dict[int, int] | None = None) -> None:
    """Back-propagate batch ``seed`` in ``parts`` micro-batches; ``absent[part] = task`` gives that task None."""
    x, targets = _data(seed)
    for part in range(parts):
        losses: list[Any] = _losses(mtl(x.chunk(parts)[part]), targets.chunk(parts, dim=1)[part], parts)
        if absent and part in absent:
            losses[absent[part]] = None
        mtl.backward(losses)


def test_a_task_absent_from_some_micro_batches() -> None:
    """Task 2 labelled in the second half only: its loss is the sum over its labelled rows / the batch size (a
    masked loss), which the micro-batches sum to as well; and a task absent from every micro-batch stays out."""
    x, targets = _data(0)
    whole = mtlzoo.MTLWrapper(_model(), "mgda")
    predictions = whole(x)
    losses = _losses(predictions, targets, 1)
    losses[2] = ((predictions[2][SIZE // 2:] - targets[2][SIZE // 2:]) ** 2).sum() / SIZE
    whole.backward(losses)
    whole.step(torch.optim.SGD(whole.parameters(), lr=0.05))
    accumulated = mtlzoo.MTLWrapper(_model(), "mgda", aggregate_at="step")
    _micro_batches(accumulated, 0, absent={0: 2})
    accumulated.step(torch.optim.SGD(accumulated.parameters(), lr=0.05))
    torch.testing.assert_close(_flat(accumulated), _flat(whole), rtol=1e-9, atol=1e-10)

    whole = mtlzoo.MTLWrapper(_model(), "mgda")
    whole.backward([*_losses(whole(x), targets, 1)[:2], None])
    whole.step(torch.optim.SGD(whole.parameters(), lr=0.05))
    accumulated = mtlzoo.MTLWrapper(_model(), "mgda", aggregate_at="step")
    _micro_batches(accumulated, 0, absent={0: 2, 1: 2})
    accumulated.step(torch.optim.SGD(accumulated.parameters(), lr=0.05))
    torch.testing.assert_close(_flat(accumulated), _flat(whole), rtol=1e-9, atol=1e-10)
    assert accumulated.heads[2][0].weight.grad is None


def test_gradscaler_unscales_before_aggregating() -> None:
    """Under a GradScaler (scale 2^12) the step is the unscaled one: the same as without a scaler, in float32."""
    runs = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)):
        mtl = mtlzoo.MTLWrapper(_model(torch.float32), "nash_mtl", aggregate_at="step")
        optimizer = torch.optim.SGD(mtl.parameters(), lr=0.05)
        for step in range(2):
            optimizer.zero_grad()
            x, targets = _data(step, torch.float32)
            for part in range(2):
                losses = _losses(mtl(x.chunk(2)[part]), targets.chunk(2, dim=1)[part], 2)
                mtl.backward(losses, scaler=scaler)
            assert mtl.step(optimizer, scaler=scaler)
        runs.append(mtl)
    torch.testing.assert_close(_flat(runs[1]), _flat(runs[0]), rtol=1e-4, atol=1e-5)
    key = "inner.inner.previous_weights"  # Nash-MTL's running state
    torch.testing.assert_close(runs[1].strategy.state_dict()[key], runs[0].strategy.state_dict()[key], rtol=1e-4,
                               atol=1e-5)


def test_a_skipped_step_drops_the_buffer_and_keeps_the_state() -> None:
    mtl = mtlzoo.MTLWrapper(_model(torch.float32), "nash_mtl", aggregate_at="step")
    optimizer = torch.optim.SGD(mtl.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    x, targets = _data(0, torch.float32)
    mtl.backward(_losses(mtl(x), targets, 1), scaler=scaler)
    assert mtl.step(optimizer, scaler=scaler)  # one step taken: the state is not the initial one
    before, state = _flat(mtl).clone(), {k: v.clone() for k, v in mtl.strategy.state_dict().items()
                                         if isinstance(v, torch.Tensor)}
    optimizer.zero_grad()
    losses = _losses(mtl(x.chunk(2)[0]), targets.chunk(2, dim=1)[0], 2)
    mtl.backward([losses[0] * 1e36, *losses[1:]], scaler=scaler)  # overflows once scaled
    mtl.backward(_losses(mtl(x.chunk(2)[1]), targets.chunk(2, dim=1)[1], 2), scaler=scaler)
    assert not mtl.step(optimizer, scaler=scaler)
    assert torch.equal(_flat(mtl), before) and mtl._buffer.empty
    for key, value in state.items():
        assert torch.equal(mtl.strategy.state_dict()[key], value), key
    # the next step starts afresh: as a wrapper that never saw the skipped micro-batches
    fresh = mtlzoo.MTLWrapper(_model(torch.float32), "nash_mtl", aggregate_at="step")
    fresh.load_state_dict(mtl.state_dict())
    for wrapper in (mtl, fresh):
        wrapper.zero_grad()
        _micro_batches_float32(wrapper, 1)
        assert wrapper.step(torch.optim.SGD(wrapper.parameters(), lr=0.05), scaler=None)
    torch.testing.assert_close(_flat(mtl), _flat(fresh), rtol=0, atol=0)


def _micro_batches_float32(mtl: mtlzoo.MTLWrapper, seed: int) -> None:
    x, targets = _data(seed, torch.float32)
    for part in range(2):
        mtl.backward(_losses(mtl(x.chunk(2)[part]), targets.chunk(2, dim=1)[part], 2))


def test_a_plain_optimizer_step_is_refused_at_the_next_backward() -> None:
    mtl = mtlzoo.MTLWrapper(_model(), "mgda", aggregate_at="step")
    optimizer = torch.optim.SGD(mtl.parameters(), lr=0.05)
    _micro_batches(mtl, 0)
    optimizer.step()  # steps the heads only: the shared part's gradient waits in the buffer
    x, targets = _data(1)
    with pytest.raises(BackwardOrderError, match=r"mtl\.step"):
        mtl.backward(_losses(mtl(x), targets, 1))
    assert mtl._buffer.empty


@pytest.mark.parametrize("zero_grad", ["optimizer", "wrapper"])
def test_zero_grad_drops_the_buffered_micro_batches(zero_grad: str) -> None:
    """As in plain PyTorch, zero_grad between micro-batches forgets the earlier ones: the step is the later ones'."""
    runs = []
    for forget in (True, False):
        mtl = mtlzoo.MTLWrapper(_model(), "upgrad", aggregate_at="step")
        optimizer = torch.optim.SGD(mtl.parameters(), lr=0.05)
        x, targets = _data(0)
        if forget:
            mtl.backward(_losses(mtl(x.chunk(2)[0]), targets.chunk(2, dim=1)[0], 2))
            (optimizer if zero_grad == "optimizer" else mtl).zero_grad()
        mtl.backward(_losses(mtl(x.chunk(2)[1]), targets.chunk(2, dim=1)[1], 2))
        mtl.step(optimizer)
        runs.append(_flat(mtl))
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)


def test_a_checkpoint_between_micro_batches_is_refused() -> None:
    mtl = mtlzoo.MTLWrapper(_model(), "nash_mtl", aggregate_at="step")
    x, targets = _data(0)
    mtl.backward(_losses(mtl(x.chunk(2)[0]), targets.chunk(2, dim=1)[0], 2))
    with pytest.raises(BackwardOrderError, match=r"after mtl\.step"):
        mtl.state_dict()
    mtl.backward(_losses(mtl(x.chunk(2)[1]), targets.chunk(2, dim=1)[1], 2))
    mtl.step(torch.optim.SGD(mtl.parameters(), lr=0.05))
    assert "strategy.inner.inner.previous_weights" in mtl.state_dict()


def test_the_buffer_holds_k_by_n_in_the_parameters_dtype() -> None:
    mtl = mtlzoo.MTLWrapper(_model(), "upgrad", aggregate_at="step")
    _micro_batches(mtl, 0)
    n = sum(p.numel() for p in mtl.backbone.parameters())
    (batch,) = mtl._buffer.batches
    assert batch.jacobian.shape == (K, n) and batch.jacobian.dtype == torch.float64
    assert isinstance(mtl._buffer, StepBuffer)


def test_a_wrapper_pickled_before_aggregate_at_existed_loads_with_the_default() -> None:
    """A pickle of a wrapper from before this option has neither attribute: it unpickles aggregating at backward."""
    import pickle

    wrapper = mtlzoo.MTLWrapper(mtlzoo.HardSharing(nn.Linear(3, 4), [nn.Linear(4, 1), nn.Linear(4, 1)]), "mgda")
    state = wrapper.__getstate__()
    for name in ("aggregate_at", "_buffer"):
        state.pop(name)
    old = mtlzoo.MTLWrapper.__new__(mtlzoo.MTLWrapper)
    old.__setstate__(state)
    restored = pickle.loads(pickle.dumps(old))
    assert restored.aggregate_at == "backward" and restored._buffer is None
