"""Data-parallel training (issue 20): 2 processes on gloo (CPU), each on its share of a batch, take the step one
process takes on the whole batch, for every registered strategy and target; the ranks stay bit for bit equal.

The reference is the same wrapper trained by the same loop in one process on the whole batch
(``distributed=False``): what is checked is the engine's claim (docs/distributed.md) that the ranks compute
the whole batch's update, which the ranks' own updates averaged by DDP (the wrong implementation, what DDP
alone gives) miss by 1e-2 to 1 for all but ``ls``, ``rlw`` and ``dualproj`` on this problem. Every rank is built
from a seed of its own, so agreement also checks that the model and the strategy's state (random streams
included) are made rank 0's. All runs of this module share one launch of 2 processes
(:mod:`tests.engine.distributed_worker`); each test reads its case's results.
"""

from __future__ import annotations

import os
import re
import runpy
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from filelock import FileLock

import mtlzoo
from mtlzoo.engine.distributed import strategy_names
from mtlzoo.engine.internals import DDP_IGNORED
from mtlzoo.errors import DistributedError
from tests.engine.distributed_worker import (
    STEPS,
    UNEVEN,
    Case,
    absent_somewhere,
    accumulated,
    build,
    cases_of_the_registry,
    functional_run,
    launch,
    train,
)
from tests.helpers import batch, small_model

CASES = cases_of_the_registry()
SOME: list[Case] = [("ls", None), ("uw", None), ("upgrad", "parameters"), ("mgda", "representation"),
                    ("rotograd", None), ("graddrop", "representation"), ("gradnorm", None), ("pcgrad", "parameters")]
"""One case per path: losses (fixed, learned weights), parameters (Gramian, the last layer's norms), representation
(Gramian, gradients gathered with the representation), random draws."""
GATHERED: list[Case] = [("rotograd", None), ("graddrop", "representation"), ("mgda", "representation"),
                        ("upgrad", "parameters")]
"""Cases whose shares' sizes matter: the gathered representation gradients, and two reduced statistics."""
FUNCTIONAL = [case for case in SOME if case[0] != "rotograd"]  # the functional face runs no adapter
RTOL, ATOL = 1e-5, 1e-6
"""1e-5 relative; the absolute term is 1e-5 of the weights' scale (0.1), for entries that cancel to near 0."""


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """The one launch, shared by the xdist workers of a session (the first one runs it, the others wait)."""
    shared = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    out = shared / "distributed-runs"
    with FileLock(str(out) + ".lock"):
        if not (out / "done").exists():
            out.mkdir(exist_ok=True)
            launch(out, [("sweep", CASES), ("absent", CASES), ("resume", CASES), ("uneven", GATHERED),
                         ("accumulation", SOME), ("nested", SOME), ("functional", FUNCTIONAL),
                         ("refusals", [])])
            (out / "done").touch()
    return out


def results(runs: Path, scenario: str, name: str, target: str | None = None) -> list[Any]:
    found = [torch.load(runs / f"{scenario}-{name}-{target}-{rank}.pt", weights_only=False) for rank in (0, 1)]
    for rank, result in enumerate(found):
        assert not isinstance(result, str), f"rank {rank} raised:\n{result}"
    return found


def assert_identical(first: Any, second: Any, where: str = "") -> None:
    """Bit for bit (NaN equal to NaN), through nested dicts and lists."""
    if isinstance(first, torch.Tensor):
        assert torch.equal(first.isnan(), second.isnan()), where
        assert torch.equal(first.nan_to_num(), second.nan_to_num()), where
    elif isinstance(first, dict):
        assert first.keys() == second.keys(), where
        for key in first:
            assert_identical(first[key], second[key], f"{where}.{key}")
    elif isinstance(first, float) and first != first:
        assert second != second, where
    elif isinstance(first, (list, tuple)):
        assert len(first) == len(second), where
        for index, (a, b) in enumerate(zip(first, second)):
            assert_identical(a, b, f"{where}[{index}]")
    else:
        assert first == second, where


def assert_whole_batch(actual: Any, expected: Any, where: str = "") -> None:
    """Within 1e-5 relative (see RTOL): tensors and floats; everything else (random streams, counters) equal."""
    if isinstance(expected, torch.Tensor) and expected.is_floating_point():
        torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, equal_nan=True,
                                   msg=lambda message: f"{where}: {message}")
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected, rel=RTOL, abs=ATOL, nan_ok=True), where
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys(), where
        for key in expected:
            assert_whole_batch(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for index, (a, b) in enumerate(zip(actual, expected)):
            assert_whole_batch(a, b, f"{where}[{index}]")
    else:
        assert_identical(actual, expected, where)


def one_process(name: str, target: str | None, **options: Any) -> dict:
    mtl, optimizer = build(name, target, seed=100, distributed=False)
    train(mtl, mtl, optimizer, None, **options)
    return mtl.state_dict()


@pytest.mark.parametrize(("name", "target"), CASES)
def test_two_ranks_take_the_step_of_the_whole_batch(runs: Path, name: str, target: str | None) -> None:
    first, second = results(runs, "sweep", name, target)
    assert_identical(first, second)
    assert_whole_batch(first, one_process(name, target))


@pytest.mark.parametrize(("name", "target"), CASES)
def test_a_task_absent_from_some_ranks_is_handled_as_the_whole_batch(runs: Path, name: str,
                                                                     target: str | None) -> None:
    """Task 1 absent from rank 0's share only (the whole batch's loss: its masked mean), task 2 from every share
    at one step (absent from the whole batch); before, a rank-local absence killed the job in the collective.
    A strategy that one process refuses absent tasks with is refused the same way on every rank."""
    try:
        expected = one_process(name, target, absent=absent_somewhere)
    except Exception as error:  # the strategy's own limitation (a plugin's), not the distributed path's
        for rank in (0, 1):
            found = torch.load(runs / f"absent-{name}-{target}-{rank}.pt", weights_only=False)
            assert isinstance(found, str) and f"{type(error).__name__}: {error}" in found
        return
    first, second = results(runs, "absent", name, target)
    assert_identical(first, second)
    assert_whole_batch(first, expected)


@pytest.mark.parametrize(("name", "target"), CASES)
def test_a_rank_0_checkpoint_resumes_on_two_ranks_and_on_one(runs: Path, name: str, target: str | None) -> None:
    """Saved by rank 0 after 3 steps: resumed on 2 ranks (built from other seeds) it continues bit for bit; in one
    process on the whole batch, within rounding."""
    continued = results(runs, "continued", name, target)
    resumed = results(runs, "resumed", name, target)
    assert_identical(continued[0], continued[1])
    assert_identical(resumed[0], continued[0])
    assert_identical(resumed[1], continued[1])
    mtl, optimizer = build(name, target, seed=300, distributed=False)
    saved = torch.load(runs / f"checkpoint-{name}-{target}.pt", weights_only=False)
    mtl.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    train(mtl, mtl, optimizer, None, first=STEPS)
    assert_whole_batch(continued[0], mtl.state_dict())


@pytest.mark.parametrize(("name", "target"), GATHERED)
def test_shares_of_different_sizes_take_the_mean_of_the_shares(runs: Path, name: str, target: str | None) -> None:
    """Shares of 6 and 10 rows: the step of the mean of the shares' mean losses (DDP's average), one process."""
    first, second = results(runs, "uneven", name, target)
    assert_identical(first, second)
    assert_whole_batch(first, one_process(name, target, split=UNEVEN))


@pytest.mark.parametrize(("name", "target"), SOME)
def test_micro_batches_accumulate_as_in_one_process(runs: Path, name: str, target: str | None) -> None:
    """Two micro-batches per step under ``ddp.no_sync()``: each backward reads the statistics of its micro-batch
    over all ranks, as one process reads those of the same micro-batch."""
    first, second = results(runs, "accumulation", name, target)
    assert_identical(first, second)
    mtl, optimizer = build(name, target, seed=100, distributed=False)
    accumulated(mtl, mtl, optimizer, None)
    assert_whole_batch(first, mtl.state_dict())


@pytest.mark.parametrize(("name", "target"), SOME)
def test_a_wrapper_inside_a_module_that_ddp_wraps(runs: Path, name: str, target: str | None) -> None:
    """As under Lightning's ``ddp`` strategy: the module holding the wrapper is what DDP wraps. Holding it with the
    strategy kept out of DDP (``strategy_names``), tasks absent from some or all shares are handled too."""
    first, second = results(runs, "nested", name, target)
    assert_identical(first, second)
    assert_whole_batch(first, one_process(name, target))
    first, second = results(runs, "ignoring", name, target)
    assert_identical(first, second)
    assert_whole_batch(first, one_process(name, target, absent=absent_somewhere))


@pytest.mark.parametrize(("name", "target"), FUNCTIONAL)
def test_the_functional_face_takes_the_step_of_the_whole_batch(runs: Path, name: str, target: str | None) -> None:
    """``mtlzoo.engine.backward`` on a model of per-task attention over a shared trunk, under DDP."""
    first, second = results(runs, "functional", name, target)
    assert_identical(first, second)
    assert_whole_batch(first, functional_run(name, target, None, seed=100))


def refusal(runs: Path, name: str) -> list[Any]:
    return [torch.load(runs / f"refusals-{name}-{rank}.pt", weights_only=False) for rank in (0, 1)]


def test_a_model_whose_gradients_ddp_does_not_average_is_refused_after_the_first_step(runs: Path) -> None:
    for error in refusal(runs, "not_in_ddp"):
        assert "DistributedError" in error and "DistributedDataParallel(mtl)" in error


def test_a_loss_refused_on_one_rank_stops_every_rank(runs: Path) -> None:
    """Rank 1's NaN loss: its LossError, and rank 0 raises too instead of waiting in the collective."""
    first, second = refusal(runs, "refused_loss")
    assert "LossError" in second and "Non-finite losses" in second
    assert "DistributedError" in first and "Another rank refused" in first


def test_a_strategy_shaped_at_the_first_training_forward_is_refused(runs: Path) -> None:
    for error in refusal(runs, "lazy"):
        assert "DistributedError" in error and "rotation_shape" in error


def test_batch_norm_is_warned_about(runs: Path) -> None:
    for messages in refusal(runs, "batch_norm"):
        assert not isinstance(messages, str), messages
        assert any("Batch norm layers (backbone.1)" in message and "SyncBatchNorm" in message for message in messages)


# ---------------------------------------------------------------------- the documentation's example
EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "train_distributed.py"


def printed_losses(text: str) -> list[tuple[float, float]]:
    """The (quadrant, contrast) losses of each printed step."""
    return [tuple(float(value) for value in re.findall(r"(?:quadrant|contrast) (\S+)", line))  # type: ignore[misc]
            for line in text.splitlines() if line.startswith("epoch ")]


def test_the_docs_torchrun_example_prints_the_losses_of_one_process(monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The command of docs/distributed.md, 2 CPU processes under torchrun, against the same script in one process
    (this one: a process group of one, which the engine leaves alone): the same whole-batch losses, to 1e-5."""
    root = EXAMPLE.parents[2]
    environment = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    ran = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(EXAMPLE)], capture_output=True, text=True, env=environment, timeout=600, cwd=root)
    assert ran.returncode == 0, ran.stderr[-3000:]
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE)])
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    two, one = printed_losses(ran.stdout), printed_losses(capsys.readouterr().out)
    assert len(two) == len(one) == 16 and all(len(row) == 2 for row in one)
    for step, (ours, theirs) in enumerate(zip(two, one)):
        assert ours == pytest.approx(theirs, rel=1e-5, abs=2e-6), f"step {step}"  # printed to 6 decimals
    assert one[-1][0] < 0.5 * one[0][0]  # and it learns


# ---------------------------------------------------------------------- in this process
def test_the_setting_is_checked_and_true_needs_a_process_group() -> None:
    with pytest.raises(ValueError, match="`distributed`"):
        mtlzoo.MTLWrapper(small_model(), "ls", distributed="yes")
    mtl = mtlzoo.MTLWrapper(small_model(), "ls", distributed=True)
    with pytest.raises(DistributedError, match="not initialized"):
        mtl(batch()[0])
    mtlzoo.MTLWrapper(small_model(), "ls")(batch()[0])  # the default: one process without a process group


def test_ddp_is_told_to_leave_the_strategy_alone() -> None:
    """The attribute DDP's constructor reads (internals.DDP_IGNORED) names the strategy's parameters and buffers."""
    mtl = mtlzoo.MTLWrapper(small_model(), "gradnorm", alpha=1.5)
    names = getattr(mtl, DDP_IGNORED)
    assert names == ["strategy.task_weights", "strategy.initial_losses"] == strategy_names(mtl)
    assert {name for name, _ in mtl.named_parameters()} >= {"strategy.task_weights"}
    mtl._ddp_params_and_buffers_to_ignore = ["backbone.0.bias"]  # torch's setter, as a user may call it
    assert getattr(mtl, DDP_IGNORED) == [*names, "backbone.0.bias"]
