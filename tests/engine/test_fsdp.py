"""FSDP and GradScaler under torch.distributed (issue 20): 2 processes on gloo (CPU), each on its share of a batch.

The reference is the same wrapper trained by the same loop in one process on the whole batch
(``distributed=False``), as in tests/engine/test_distributed.py. Under ``fully_shard`` every registered strategy
whose request reads the losses or the representation takes the whole batch's step; the wrong implementations this
catches: the heads' gradients never reaching FSDP's reduce-scatter (their ``.grad`` stays empty), each rank's own
update, or the strategy's parameters (RotoGrad's rotations) learning from a rank's own head gradients. The
strategies that read the shared parameters are refused, each of them, by name. All runs share one launch of 2
processes; each test reads its case's results.
"""

from __future__ import annotations

import datetime
import gc
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from filelock import FileLock
from torch import nn

import mtlzoo
from tests.engine.distributed_worker import (
    EVEN,
    STEPS,
    Case,
    absent_somewhere,
    build,
    cases_of_the_registry,
    record,
    rows_of,
    train,
)
from tests.engine.test_distributed import assert_identical, assert_whole_batch, one_process
from tests.helpers import batch, required_kwargs


def reads(case: Case) -> str:
    """Where the case's request reads: ``losses``, ``representation`` or ``parameters``."""
    name, target = case
    return mtlzoo.create(name, num_tasks=3, **required_kwargs(name),
                         **({} if target is None else {"target": target})).request.where


SHARDED = cases_of_the_registry()
"""Every registered strategy, once per target: trained under ``fully_shard``."""
RESHARDED: list[Case] = [("upgrad", "parameters"), ("upgrad", "representation")]
"""With the backbone resharded after its forward: the parameters refused, the representation trained."""
LEGACY: list[Case] = [("ls", None), ("uw", None), ("upgrad", "representation")]
"""Under ``FullyShardedDataParallel``: losses only (trained), and a strategy that reads gradients (refused)."""
SCALED: list[Case] = [("ls", None), ("upgrad", "representation"), ("upgrad", "parameters"), ("rotograd", None)]
"""Under DDP with a GradScaler: a loss weighting, a Gramian on each target, an adapter with parameters of its own."""
ABSENT: list[Case] = [("ls", None), ("upgrad", "representation"), ("upgrad", "parameters")]
"""Tasks absent from some shares under ``fully_shard``."""
HUGE = 1e34
"""Rank 1's losses are multiplied by this at step 1: finite, but times the scale (2**16) they overflow float32."""


# ---------------------------------------------------------------------- run on every rank
def gone(step: int, rank: int) -> set[int]:
    """Task 2 absent from every share at step 1 (from the whole batch)."""
    return {2} if step == 1 else set()


def sharded_model(mtl: mtlzoo.MTLWrapper, legacy: bool, reshard: bool | None = None, heads: bool = True) -> None:
    """The backbone and each head sharded (the same initial weights on every rank: FSDP broadcasts nothing)."""
    if not legacy:
        from torch.distributed.fsdp import fully_shard

        for part in (mtl.backbone, *(mtl.heads if heads else ())):
            fully_shard(part, reshard_after_forward=reshard)
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    def wrap(module: nn.Module) -> nn.Module:
        return FullyShardedDataParallel(module, use_orig_params=True, device_id=torch.device("cpu"))
    mtl.backbone = wrap(mtl.backbone)
    for index in range(len(mtl.heads)):
        mtl.heads[index] = wrap(mtl.heads[index])


def sharded_run(name: str, target: str | None, rank: int, *, legacy: bool = False, absent: Any = None,
                reshard: bool | None = None, heads: bool = True) -> dict:
    mtl, _ = build(name, target, seed=100)
    sharded_model(mtl, legacy, reshard, heads)
    groups: list[dict[str, Any]] = [{"params": list(mtl.model_parameters())}]
    if own := mtl.strategy_parameters():
        groups.append({"params": own, "lr": 0.01})
    options = {} if absent is None else {"absent": absent}
    train(mtl, mtl, torch.optim.SGD(groups, lr=0.1, momentum=0.5), rank, regularise=False, **options)
    return {key: value.full_tensor() if hasattr(value, "full_tensor") else value
            for key, value in mtl.state_dict().items()}


def scaled_losses(predictions: list[torch.Tensor], targets: torch.Tensor, step: int, rank: int | None
                  ) -> list[torch.Tensor]:
    """Mean squared errors, rank 1's multiplied by :data:`HUGE` at step 1; one process: the mean of the shares'."""
    factor = [1.0, HUGE if step == 1 else 1.0]
    losses = []
    for prediction, target in zip(predictions, targets):
        errors = (prediction - target) ** 2
        if rank is not None:
            losses.append(errors.mean() * factor[rank])
        else:
            losses.append(sum(errors[rows_of(r, EVEN)].mean() * factor[r] for r in (0, 1)) / 2)
    return losses


def scaled_run(name: str, target: str | None, rank: int | None, seed: int) -> dict:
    """Three steps under ``torch.amp.GradScaler("cpu")``, the second overflowing on rank 1 only; what each step
    leaves (the model and strategy, the optimizer, the scaler) and whether it was taken."""
    mtl, optimizer = build(name, target, seed=seed, distributed=None if rank is not None else False)
    forward = mtl if rank is None else nn.parallel.DistributedDataParallel(mtl)
    scaler = torch.amp.GradScaler("cpu")
    rows = slice(None) if rank is None else rows_of(rank, EVEN)
    taken, states = [], []
    for step in range(STEPS):
        x, targets = batch(seed=step, size=sum(EVEN))
        optimizer.zero_grad()
        mtl.backward(scaled_losses(forward(x[rows]), targets[:, rows], step, rank), scaler=scaler)
        taken.append(mtl.step(optimizer, scaler=scaler))
        states.append(_cloned({"model": mtl.state_dict(), "optimizer": optimizer.state_dict()["state"],
                               "scale": scaler.get_scale()}))
    return {"taken": taken, "states": states}


def _cloned(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {key: _cloned(item) for key, item in value.items()}
    return value


def main(rank: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    here = Path(out)
    try:
        for name, target in SHARDED:
            record(here / f"sharded-{name}-{target}-{rank}.pt", lambda n=name, t=target: sharded_run(n, t, rank))
        for name, target in RESHARDED:
            record(here / f"resharded-{name}-{target}-{rank}.pt",
                   lambda n=name, t=target: sharded_run(n, t, rank, reshard=True))
        for name, target in LEGACY:
            record(here / f"legacy-{name}-{target}-{rank}.pt",
                   lambda n=name, t=target: sharded_run(n, t, rank, legacy=True))
        for name, target in ABSENT:
            record(here / f"absent-{name}-{target}-{rank}.pt",
                   lambda n=name, t=target: sharded_run(n, t, rank, absent=absent_somewhere))
            record(here / f"gone-{name}-{target}-{rank}.pt",
                   lambda n=name, t=target: sharded_run(n, t, rank, absent=gone))
        for name, target in [("ls", None), ("upgrad", "representation")]:
            record(here / f"partial-{name}-{target}-{rank}.pt",
                   lambda n=name, t=target: sharded_run(n, t, rank, heads=False))
        for name, target in SCALED:
            record(here / f"scaled-{name}-{target}-{rank}.pt",
                   lambda n=name, t=target: scaled_run(n, t, rank, seed=100 + rank))
        dist.barrier()  # no rank tears the group down while another still uses it (gloo aborts then)
    finally:
        gc.collect()
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """The one launch, shared by the xdist workers of a session (the first one runs it, the others wait)."""
    shared = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    out = shared / "fsdp-runs"
    with FileLock(str(out) + ".lock"):
        if not (out / "done").exists():
            out.mkdir(exist_ok=True)
            torch.multiprocessing.spawn(main, args=(str(out),), nprocs=2)
            (out / "done").touch()
    return out


def loaded(runs: Path, scenario: str, name: str, target: str | None) -> list[Any]:
    return [torch.load(runs / f"{scenario}-{name}-{target}-{rank}.pt", weights_only=False) for rank in (0, 1)]


def trained(runs: Path, scenario: str, name: str, target: str | None) -> list[Any]:
    found = loaded(runs, scenario, name, target)
    for rank, result in enumerate(found):
        assert not isinstance(result, str), f"rank {rank} raised:\n{result}"
    return found


# ---------------------------------------------------------------------- the tests
@pytest.mark.parametrize(("name", "target"), SHARDED)
def test_under_fully_shard_every_strategy_takes_the_whole_batch_step(runs: Path, name: str, target: str | None
                                                                    ) -> None:
    """``fully_shard`` on the backbone and each head: after 3 steps the model (gathered from its shards) and the
    strategy's state equal one process's on the whole batch within 1e-5, and the ranks are bit for bit equal."""
    first, second = trained(runs, "sharded", name, target)
    assert_identical(first, second)
    assert_whole_batch(first, one_process(name, target, regularise=False))


@pytest.mark.parametrize(("name", "target"), RESHARDED)
def test_a_backbone_resharded_after_its_forward(runs: Path, name: str, target: str | None) -> None:
    """``reshard_after_forward=True``: the backbone's parameters are shards when the Jacobian would be formed on them,
    which is refused on every rank (it was 8e-3 off, silently); the representation target needs no gathered backbone."""
    if reads((name, target)) == "parameters":
        for error in loaded(runs, "resharded", name, target):
            assert isinstance(error, str) and "DistributedError" in error and "reshard_after_forward=False" in error
        return
    first, second = trained(runs, "resharded", name, target)
    assert_identical(first, second)
    assert_whole_batch(first, one_process(name, target, regularise=False))


@pytest.mark.parametrize(("name", "target"), LEGACY)
def test_under_fully_sharded_data_parallel(runs: Path, name: str, target: str | None) -> None:
    """``FullyShardedDataParallel`` (CPU, ``use_orig_params``): losses only as one process; gradients refused (it
    frees the heads' gathered parameters after the heads' first backward, which the representation target needs
    twice: 'setStorage ... out of bounds for storage of size 0' when tried)."""
    found = loaded(runs, "legacy", name, target)
    if reads((name, target)) != "losses":
        for error in found:
            assert isinstance(error, str) and "DistributedError" in error and "fully_shard instead" in error
        return
    first, second = trained(runs, "legacy", name, target)
    assert_identical(first, second)
    assert_whole_batch(first, one_process(name, target, regularise=False))


@pytest.mark.parametrize(("name", "target"), ABSENT)
def test_under_fsdp_a_task_absent_from_some_ranks_only_is_refused_and_one_absent_from_all_is_left_out(
        runs: Path, name: str, target: str | None) -> None:
    """Absent from rank 0's share only: refused on every rank, without a hang (before the refusal the job died,
    SIGABRT: FSDP's reduce-scatter skipped on one rank only). Absent from every share: as one process."""
    for error in loaded(runs, "absent", name, target):
        assert isinstance(error, str) and "DistributedError" in error and "some ranks and None on others" in error
    first, second = trained(runs, "gone", name, target)
    assert_identical(first, second)
    assert_whole_batch(first, one_process(name, target, regularise=False, absent=gone))


@pytest.mark.parametrize(("name", "target"), [("ls", None), ("upgrad", "representation")])
def test_under_fsdp_heads_left_unsharded_are_refused(runs: Path, name: str, target: str | None) -> None:
    """Only the backbone sharded: no one would average the heads' gradients (the ranks' check of agreement after
    the first step cannot see FSDP's shards), so the first training forward refuses it on every rank."""
    for error in loaded(runs, "partial", name, target):
        assert isinstance(error, str) and "DistributedError" in error and "but not heads.0.0.weight" in error


@pytest.mark.parametrize(("name", "target"), SCALED)
def test_a_grad_scaler_skips_an_overflowing_step_on_every_rank(runs: Path, name: str, target: str | None) -> None:
    """DDP and ``torch.amp.GradScaler("cpu")``: rank 1's scaled gradients overflow at step 1 (rank 0's do not); both
    ranks skip that step and keep the model, the strategy's state and the optimizer's as they were, with the scale
    halved; the other steps equal one process's, whose whole-batch loss overflows at the same step."""
    first, second = trained(runs, "scaled", name, target)
    assert_identical(first, second)
    expected = scaled_run(name, target, None, seed=100)
    assert first["taken"] == expected["taken"] == [True, False, True]
    before, skipped = first["states"][0], first["states"][1]
    assert_identical(skipped["model"], before["model"])
    assert_identical(skipped["optimizer"], before["optimizer"])
    assert skipped["scale"] == before["scale"] / 2
    for step in (0, 2):
        assert_whole_batch(first["states"][step]["model"], expected["states"][step]["model"], f"step {step}")
        assert first["states"][step]["scale"] == expected["states"][step]["scale"]
