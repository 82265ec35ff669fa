"""Declared running state (mtlzoo.state): staged in a step, committed at advance, dropped at discard, saved whole."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
from torch import Tensor

import mtlzoo
from mtlzoo.protocol import StepInputs


class Counting(mtlzoo.LossWeighting):
    """A stateful weighting for the tests: weights from the running mean of the first micro-batch's losses."""

    info = mtlzoo.StrategyInfo(name="counting", summary="test double")

    def __init__(self, num_tasks: int) -> None:
        super().__init__(num_tasks)
        self.declare_state(mean=torch.zeros(num_tasks), steps=0)
        self.declare_state("every", seen=0)

    def weights(self, losses: Tensor) -> Tensor:
        steps = self.state.steps
        self.state.mean = (self.state.mean * steps + losses.detach()) / (steps + 1)
        self.state.seen = self.state.seen + 1
        return torch.ones_like(losses)

    def on_advance(self) -> None:
        self.state.steps += 1


def backward(strategy: Counting, losses: list[float]) -> None:
    inputs = StepInputs(torch.tensor(losses), torch.arange(len(losses)), strategy.num_tasks,
                        micro_batch=strategy.micro_batch)
    strategy.loss_weights(inputs)
    strategy.micro_batch += 1


def test_a_write_is_staged_read_back_and_committed_at_advance() -> None:
    strategy = Counting(2)
    backward(strategy, [1.0, 2.0])
    assert strategy.state.mean.tolist() == [1.0, 2.0]  # staged, read back
    assert strategy.mean.tolist() == [0.0, 0.0] and strategy.state.steps == 0  # committed: unchanged
    strategy.advance()
    assert strategy.mean.tolist() == [1.0, 2.0] and strategy.state.steps == 1


def test_a_first_field_takes_the_first_micro_batch_and_an_every_field_each() -> None:
    strategy = Counting(2)
    backward(strategy, [1.0, 2.0])
    backward(strategy, [5.0, 6.0])  # a second micro-batch: `mean` keeps the first one's value
    assert strategy.state.mean.tolist() == [1.0, 2.0] and strategy.state.seen == 2
    strategy.advance()
    assert strategy.state.seen == 2 and strategy.micro_batch == 0


def test_discard_drops_what_the_step_staged() -> None:
    strategy = Counting(2)
    backward(strategy, [1.0, 2.0])
    strategy.discard()
    assert strategy.state.mean.tolist() == [0.0, 0.0] and strategy.state.seen == 0 and strategy.micro_batch == 0
    strategy.advance()
    assert strategy.state.steps == 1 and strategy.mean.tolist() == [0.0, 0.0]


def test_state_dict_saves_committed_values_and_a_mid_step_checkpoint_continues_the_step() -> None:
    strategy = Counting(2)
    backward(strategy, [1.0, 2.0])
    strategy.advance()
    backward(strategy, [3.0, 5.0])  # mid-step
    saved = copy.deepcopy(strategy.state_dict())
    assert saved["mean"].tolist() == [1.0, 2.0]
    resumed = Counting(2)
    resumed.load_state_dict(saved)
    assert resumed.micro_batch == 1 and resumed.state.steps == 1
    for one in (strategy, resumed):
        backward(one, [7.0, 7.0])
        one.advance()
    assert resumed.mean.tolist() == strategy.mean.tolist() == [2.0, 3.5]
    assert resumed.state.seen == strategy.state.seen == 3 and resumed.state.steps == 2


def test_state_survives_deepcopy_pickle_and_device_moves() -> None:
    strategy = Counting(2)
    backward(strategy, [1.0, 2.0])
    strategy.advance()
    for copied in (copy.deepcopy(strategy), pickle.loads(pickle.dumps(strategy)), copy.deepcopy(strategy).double()):
        assert copied.state.mean.tolist() == [1.0, 2.0] and copied.state.steps == 1
        backward(copied, [3.0, 3.0])
        copied.advance()
        assert copied.state.steps == 2 and strategy.state.steps == 1  # not shared with the original
    assert copy.deepcopy(strategy).double().state.mean.dtype == torch.float64


def test_declaring_or_writing_a_wrong_field_is_a_clear_error() -> None:
    strategy = Counting(2)
    with pytest.raises(AttributeError, match=r"declares no state field 'nope'.*declare_state"):
        strategy.state.nope = 1
    with pytest.raises(AttributeError, match="declares no state field 'nope'"):
        _ = strategy.state.nope
    with pytest.raises(ValueError, match="declared twice"):
        strategy.declare_state(steps=1)
    with pytest.raises(ValueError, match="per_step"):
        strategy.declare_state("sometimes", other=1)


def test_a_stateful_plugin_strategy_trains_under_the_wrapper_with_accumulation_and_a_skipped_step() -> None:
    model = mtlzoo.HardSharing(torch.nn.Linear(3, 4), [torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)])
    mtl = mtlzoo.MTLWrapper(model, Counting(2))
    optimizer = torch.optim.SGD(mtl.parameters(), lr=0.1)
    x = torch.randn(8, 3)
    for half in x.chunk(2):
        mtl.backward([p.pow(2).mean() for p in mtl(half)])
    mtl.step(optimizer)
    assert mtl.strategy.state.steps == 1 and mtl.strategy.state.seen == 2

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)
    optimizer.zero_grad()
    mtl.backward([p.pow(2).mean() * 1e38 for p in mtl(x)], scaler=scaler)  # overflows: the scaler skips the step
    before = mtl.strategy.mean.clone()
    assert not mtl.step(optimizer, scaler=scaler)
    assert mtl.strategy.state.steps == 1 and mtl.strategy.state.seen == 2 and torch.equal(mtl.strategy.mean, before)


class Precise(mtlzoo.LossWeighting):
    """Test strategy (no paper): one float64 and one float32 running field."""

    info = mtlzoo.StrategyInfo(name="test_precise", kind="weighting", summary="test")

    def __init__(self, num_tasks: int) -> None:
        super().__init__(num_tasks)
        self.declare_state(wide=torch.zeros(num_tasks, dtype=torch.float64), narrow=torch.zeros(num_tasks))

    def scalarize(self, losses: Tensor) -> Tensor:
        return losses.sum()


def test_module_to_dtype_widens_a_field_but_never_narrows_it_below_its_declared_dtype() -> None:
    """Found when ExcessMTL's and PCD's float64 state met ``mtl.to(torch.float32)``: the buffer was cast, and the
    strategy's float64 arithmetic failed on it. A float64 field now reads and commits as float64 in a float32 module,
    while a float32 field follows a float64 module (issue 19's item 7: float64 stays float64)."""
    strategy = Precise(2)
    strategy.state.wide = torch.tensor([1 / 3, 2 / 3], dtype=torch.float64)
    strategy.advance()
    strategy.float()
    assert strategy.wide.dtype == torch.float64 and float(strategy.wide[0]) == 1 / 3  # not rounded to float32
    resumed = Precise(2).float()
    resumed.load_state_dict(strategy.state_dict())  # a checkpoint resumes exactly in a float32 module
    assert resumed.wide.dtype == torch.float64 and torch.equal(resumed.wide, strategy.wide)
    assert resumed.narrow.dtype == torch.float32
    strategy = Precise(2).double()
    strategy.state.narrow = torch.tensor([1 / 3, 2 / 3], dtype=torch.float64)
    strategy.advance()
    assert strategy.narrow.dtype == torch.float64 and float(strategy.narrow[0]) == 1 / 3


def test_write_rows_stages_a_copy_with_the_present_tasks_rows_written_and_the_others_kept() -> None:
    strategy = Counting(4)
    with strategy.state.direct():
        strategy.state.mean = torch.tensor([1.0, 2.0, 3.0, 4.0])
    written = strategy.state.write_rows("mean", np.array([1, 3]), np.array([20.0, 40.0]))
    assert strategy.state.mean.tolist() == [1.0, 20.0, 3.0, 40.0]  # only rows 1 and 3 written
    assert written.dtype == torch.float64  # the wider of the field's float32 and the rows' float64
    assert strategy.mean.tolist() == [1.0, 2.0, 3.0, 4.0]  # staged: the committed buffer is not changed in place
    strategy.state.write_rows("mean", torch.tensor([0]), torch.tensor([10.0]))  # a second write keeps the first's
    strategy.advance()
    assert strategy.mean.tolist() == [10.0, 20.0, 3.0, 40.0] and strategy.mean.dtype == torch.float32
