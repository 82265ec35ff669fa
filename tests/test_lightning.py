"""mtlzoo.lightning: a Lightning run is mtlzoo's own loop, step for step.

The reference is mtlzoo's documented loop (``mtl.backward``, ``mtl.step``, ``mtl.end_epoch``; README,
"How a step works") on a copy of the same module with the same batches: the Lightning run must give
the same model, the same strategy state (extra state included) and log what that loop's
``mtl.last_step`` reads. Both sides run the same float32 operations in the same order, so they agree
to rounding; the tolerances only absorb a different summation order.
"""

from __future__ import annotations

import ast
import copy
import csv
import importlib
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mtlzoo
from mtlzoo.errors import CheckpointMismatchError, InvalidModelError, LossError
from mtlzoo.lightning import MTLModule
from tests.helpers import small_model

BATCH = 16


class Net(MTLModule):
    def __init__(self, strategy: str | mtlzoo.Strategy, seed: int = 0, named: bool = False, **options: Any) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.mtl = mtlzoo.MTLWrapper(small_model(2, named=named), strategy, **options)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> Any:
        x, y = batch
        losses = task_losses(self.mtl(x), y)
        self.log("first", as_list(losses)[0])  # silenced when FAMO re-evaluates the losses after the step
        return losses

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.param_groups(strategy_lr=0.02), lr=0.01)


def task_losses(predictions: Any, y: torch.Tensor) -> Any:
    if isinstance(predictions, dict):
        return {name: nn.functional.mse_loss(p, t) for (name, p), t in zip(predictions.items(), y.unbind(1))}
    return [nn.functional.mse_loss(p, t) for p, t in zip(predictions, y.unbind(1))]


def as_list(losses: Any) -> list[torch.Tensor]:
    return list(losses.values()) if isinstance(losses, dict) else losses


def data(batches: int, seed: int = 1) -> TensorDataset:
    """Two learnable regression tasks on 5 features."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batches * BATCH, 5, generator=generator)
    y = torch.stack([2 * x[:, :1], x[:, 1:2] - x[:, 2:3]], dim=1) + 0.1 * torch.randn(len(x), 2, 1, generator=generator)
    return TensorDataset(x, y)


def trainer(**options: Any) -> pl.Trainer:
    settings = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
                "enable_model_summary": False, "enable_checkpointing": False, **options}
    return pl.Trainer(**settings)


def own_loop(net: Net, dataset: TensorDataset, epochs: int, micro_batches: int = 1, clip: float | None = None,
             autocast: torch.dtype | None = None, scaler: torch.amp.GradScaler | None = None,
             drop_odd: bool = False) -> list:
    """mtlzoo's documented loop; micro-batch losses divided by their number (task 1 absent from odd batches with
    ``drop_odd``); returns each backward's losses (as computed) and ``last_step``."""
    mtl = net.mtl

    def losses_of(x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None, cache_enabled=False):
            return as_list(task_losses(mtl(x), y))

    optimizer = net.configure_optimizers()
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    batches = list(DataLoader(dataset, batch_size=BATCH))
    used = []
    for _ in range(epochs):
        for start in range(0, len(batches), micro_batches):
            step = batches[start:start + micro_batches]
            optimizer.zero_grad()
            for index, (x, y) in enumerate(step, start):
                losses = losses_of(x, y)
                if drop_odd and index % 2:
                    losses[1] = None
                mtl.backward([None if loss is None else loss / micro_batches for loss in losses], scaler=scaler)
                used.append(([None if loss is None else loss.item() for loss in losses], mtl.last_step))
            if clip is not None:
                if scaler is not None:
                    scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(parameters, clip)

            def after(step=step) -> list[torch.Tensor]:
                per_batch = [losses_of(x, y) for x, y in step]
                return [sum(losses[k] for losses in per_batch) / micro_batches ** 2 for k in range(2)]

            mtl.step(optimizer, scaler=scaler, post_step_losses=after)
        mtl.end_epoch()
    return used


def assert_close_state(expected: Any, actual: Any, where: str = "", exact: bool = False) -> None:
    """Nested state dicts equal up to rounding (tensors, numbers, lists), or ``exact``ly; other values exactly."""
    rtol, atol = (0.0, 0.0) if exact else (1e-5, 1e-6)
    if isinstance(expected, torch.Tensor):
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True, msg=where)
    elif isinstance(expected, dict):
        assert expected.keys() == actual.keys(), where
        for key in expected:
            assert_close_state(expected[key], actual[key], f"{where}.{key}", exact)
    elif isinstance(expected, (list, tuple)):
        assert len(expected) == len(actual), where
        for index, (a, b) in enumerate(zip(expected, actual)):
            assert_close_state(a, b, f"{where}[{index}]", exact)
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected, rel=rtol, abs=atol, nan_ok=True), where
    else:
        assert actual == expected, where


def moved(before: dict[str, Any], after: dict[str, Any]) -> float:
    return max((after[key] - value).abs().max().item() for key, value in before.items()
               if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel())


# A loss weighting, one per epoch, a learned one, a surgery on each target, the RotoGrad family, FAMO.
STRATEGIES = [("ls", {}), ("dwa", {}), ("uw", {}), ("upgrad", {"target": "parameters"}),
              ("pcgrad", {"target": "representation"}), ("rotograd", {"rotation_shape": 4, "normalize_losses": True}),
              ("famo", {})]


@pytest.mark.parametrize(("name", "options"), STRATEGIES, ids=[name for name, _ in STRATEGIES])
def test_a_lightning_run_equals_mtlzoos_own_loop(name: str, options: dict[str, Any]) -> None:
    net = Net(name, **options)
    reference = copy.deepcopy(net)
    initial = copy.deepcopy(net.state_dict())
    dataset = data(3)
    trainer(max_epochs=2).fit(net, DataLoader(dataset, batch_size=BATCH))
    own_loop(reference, dataset, epochs=2)
    assert moved(initial, net.state_dict()) > 1e-3
    assert_close_state(reference.state_dict(), net.state_dict())
    assert net.mtl.strategy.micro_batch == 0 and not net.mtl.strategy.state.staged


@pytest.mark.parametrize(("name", "options"), [("rotograd", {"rotation_shape": 4}), ("famo", {})])
def test_accumulated_batches_advance_the_state_once_per_optimizer_step(name: str, options: dict[str, Any]) -> None:
    net = Net(name, **options)
    reference = copy.deepcopy(net)
    dataset = data(6)
    advanced_at = []  # the batch index at each advance of the strategy's state
    original = net.mtl.strategy.advance
    net.mtl.strategy.advance = lambda: (advanced_at.append(net.trainer.fit_loop.epoch_loop.batch_idx), original())[1]
    trainer(max_epochs=1, accumulate_grad_batches=2).fit(net, DataLoader(dataset, batch_size=BATCH))
    assert advanced_at == [1, 3, 5]  # 6 batches, 3 optimizer steps, each advancing once after it is taken
    own_loop(reference, dataset, epochs=1, micro_batches=2)
    assert_close_state(reference.state_dict(), net.state_dict())
    if name == "rotograd":
        assert net.mtl.strategy.adapter.state.step == 3


DDP_STRATEGIES: dict[str, dict[str, Any]] = {
    "ls": {}, "uw": {}, "upgrad": {"target": "parameters"}, "pcgrad": {"target": "representation"},
    "rotograd": {"rotation_shape": 4, "normalize_losses": True}, "famo": {}}


def test_ddp_on_two_processes_gives_one_process_on_the_whole_batch(tmp_path: Path) -> None:
    """Lightning's ddp strategy (2 processes, gloo) through mtlzoo's distributed training (the engine makes what a
    strategy reads the whole batch's; branch ``distributed``, issue 20): every rank ends with the model and strategy
    state of one process on the whole batch (Lightning on 2 x BATCH), and the ranks agree bit for bit."""
    assert Net("uw")._ddp_params_and_buffers_to_ignore == ["mtl.strategy.log_variances"]  # left to mtlzoo by DDP
    root = Path(__file__).resolve().parent.parent
    names = list(DDP_STRATEGIES)
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, str(root / "tests" / "lightning_ddp_worker.py"), str(tmp_path), *names],
                   check=True, cwd=root, env=environment, timeout=600)
    dataset = data(6)  # Lightning's sampler shuffles with seed 0; rank r takes every other of that order
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))
    whole = DataLoader(TensorDataset(*(tensor[order] for tensor in dataset.tensors)), batch_size=2 * BATCH)
    for name in names:
        first, second = (torch.load(tmp_path / f"{name}.rank{rank}.pt", weights_only=False) for rank in (0, 1))
        assert_close_state(first, second, name, exact=True)
        one = Net(name, **DDP_STRATEGIES[name])
        trainer(max_steps=3).fit(one, whole)
        assert_close_state(one.state_dict(), first, name)


class Sometimes(Net):
    """Task 1 absent from the odd batches; its losses come from the parent's training_step through super()."""

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> Any:
        losses = super().training_step(batch, batch_idx)
        return [losses[0], None if batch_idx % 2 else losses[1]]


def test_a_task_absent_from_a_batch_is_left_out_as_in_mtlzoos_own_loop() -> None:
    net = Sometimes("upgrad")
    reference = copy.deepcopy(net)
    dataset = data(4)
    trainer(max_epochs=1).fit(net, DataLoader(dataset, batch_size=BATCH))
    used = own_loop(reference, dataset, epochs=1, drop_odd=True)
    assert_close_state(reference.state_dict(), net.state_dict())
    assert math.isnan(used[-1][1].coefficients[1]) and math.isnan(net.mtl.last_step.coefficients[1])


def test_gradient_clipping_clips_what_the_strategy_put_in_grad() -> None:
    net = Net("upgrad")
    reference = copy.deepcopy(net)
    dataset = data(4)
    trainer(max_epochs=1, gradient_clip_val=0.05).fit(net, DataLoader(dataset, batch_size=BATCH))
    own_loop(reference, dataset, epochs=1, clip=0.05)
    assert_close_state(reference.state_dict(), net.state_dict())
    unclipped = Net("upgrad")
    trainer(max_epochs=1).fit(unclipped, DataLoader(dataset, batch_size=BATCH))
    assert moved(unclipped.state_dict(), net.state_dict()) > 1e-3  # the clip bit


@pytest.mark.parametrize("name", ["dwa", "famo", "rotograd"])
def test_a_run_resumed_from_a_checkpoint_equals_an_uninterrupted_one(name: str, tmp_path: Path) -> None:
    options = {"rotation_shape": 4, "normalize_losses": True, "burn_in_period": 4} if name == "rotograd" else {}
    loader = DataLoader(data(3), batch_size=BATCH)
    whole = Net(name, **options)
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    trainer(max_epochs=3, enable_checkpointing=True, callbacks=[checkpoints]).fit(whole, loader)
    saved = torch.load(tmp_path / "epoch=0-step=3.ckpt", weights_only=False)["state_dict"]
    assert any(key.startswith("mtl.strategy.") for key in saved)
    resumed = Net(name, seed=7, **options)  # other initial values: everything comes from the checkpoint
    trainer(max_epochs=3).fit(resumed, loader, ckpt_path=tmp_path / "epoch=0-step=3.ckpt")
    assert_close_state(whole.state_dict(), resumed.state_dict())


def test_a_checkpoint_of_other_strategy_settings_is_refused_naming_them() -> None:
    saved = Net("famo", lr=0.025).state_dict()
    with pytest.raises(CheckpointMismatchError, match="lr"):
        Net("famo", lr=0.05).load_state_dict(saved)


def own_losses(net: Net, dataset: TensorDataset) -> list[float]:
    with torch.no_grad():
        return [loss.item() for loss in as_list(task_losses(net.mtl(dataset.tensors[0]), dataset.tensors[1]))]


@pytest.mark.parametrize("name", ["uw", "upgrad", "rotograd", "famo"])
def test_bf16_mixed_lowers_every_tasks_loss(name: str) -> None:
    net = Net(name, **({"rotation_shape": 4} if name == "rotograd" else {}))
    dataset = data(8)
    before = own_losses(net, dataset)
    trainer(max_epochs=5, precision="bf16-mixed").fit(net, DataLoader(dataset, batch_size=BATCH))
    after = own_losses(net, dataset)
    assert all(a < 0.8 * b for a, b in zip(after, before)), (before, after)


@pytest.mark.parametrize(("precision", "name"), [("bf16-mixed", "upgrad"), ("16-mixed", "upgrad"),
                                               ("16-mixed", "famo"), ("16-mixed", "rotograd")])
def test_a_mixed_precision_run_equals_mtlzoos_own_loop_under_autocast_and_its_scaler(precision: str, name: str) -> None:
    net = Net(name, **({"rotation_shape": 4} if name == "rotograd" else {}))
    reference = copy.deepcopy(net)
    dataset = data(4)
    half = precision == "16-mixed"
    plugin = MixedPrecision(precision, "cpu")  # Lightning's own plugin: float16 autocast and a GradScaler on the CPU
    trainer(max_epochs=1, plugins=[plugin], gradient_clip_val=1.0).fit(net, DataLoader(dataset, batch_size=BATCH))
    scaler = torch.amp.GradScaler("cpu") if half else None
    own_loop(reference, dataset, epochs=1, clip=1.0, autocast=torch.float16 if half else torch.bfloat16, scaler=scaler)
    assert_close_state(reference.state_dict(), net.state_dict())
    if half:
        assert plugin.scaler is not None and plugin.scaler.get_scale() == scaler.get_scale()


@pytest.mark.parametrize("name", ["upgrad", "famo"])
def test_16_mixed_with_its_scaler_lowers_every_tasks_loss(name: str) -> None:
    # Trainer(accelerator="cpu", precision="16-mixed") falls back to bf16-mixed (Lightning warns); the plugin
    # itself runs float16 autocast and a GradScaler on the CPU.
    net = Net(name)
    dataset = data(8)
    before = own_losses(net, dataset)
    plugin = MixedPrecision("16-mixed", "cpu")
    trainer(max_epochs=5, plugins=[plugin]).fit(net, DataLoader(dataset, batch_size=BATCH))
    after = own_losses(net, dataset)
    assert all(a < 0.8 * b for a, b in zip(after, before)), (before, after)
    assert plugin.scaler is not None and plugin.scaler.get_scale() > 1


def test_steps_the_scaler_skips_leave_the_model_and_the_strategy_state_as_they_were() -> None:
    net = Net("rotograd", rotation_shape=4, normalize_losses=True)
    initial = copy.deepcopy(net.state_dict())
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=math.inf))
    trainer(max_steps=3, plugins=[plugin]).fit(net, DataLoader(data(3), batch_size=BATCH))
    assert_close_state(initial, net.state_dict())  # every step overflowed: no state advanced, no reference kept
    assert net.mtl.strategy.adapter.state.step == 0


@pytest.mark.parametrize("name", ["uw+upgrad", "famo"])
def test_the_logger_gets_each_steps_losses_weights_and_coefficients(name: str, tmp_path: Path) -> None:
    strategy = mtlzoo.compose(weighting="uw", aggregator="upgrad", num_tasks=2) if name == "uw+upgrad" else name
    net = Net(strategy, named=True)
    reference = copy.deepcopy(net)
    dataset = data(3)
    logger = CSVLogger(tmp_path, name="run", version=0)
    trainer(max_epochs=1, logger=logger, log_every_n_steps=1).fit(net, DataLoader(dataset, batch_size=BATCH))
    used = own_loop(reference, dataset, epochs=1)
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as file:
        rows = [row for row in csv.DictReader(file) if row.get("weight/task0")]
    assert len(rows) == 3
    for row, (losses, step) in zip(rows, used):
        for k, task in enumerate(["task0", "task1"]):
            assert float(row[f"loss/{task}"]) == pytest.approx(losses[k], rel=1e-5)
            assert float(row[f"weight/{task}"]) == pytest.approx(step.loss_weights[k].item(), rel=1e-5)
            assert float(row[f"coefficient/{task}"]) == pytest.approx(step.coefficients[k].item(), rel=1e-5)
        assert float(row["first"]) == pytest.approx(losses[0], rel=1e-5)  # the user's own log, before the step
    assert len({float(row["weight/task0"]) for row in rows}) == 3  # the weights move


def test_a_module_without_its_wrapper_or_losses_is_told_what_to_do() -> None:
    class Bare(MTLModule):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            return None

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.param_groups(), lr=0.1)

    with pytest.raises(InvalidModelError, match=r"self\.mtl = mtlzoo\.MTLWrapper"):
        Bare().param_groups()
    bare = Bare()
    bare.mtl = mtlzoo.MTLWrapper(small_model(2), "ls")
    with pytest.raises(LossError, match="should return the K task losses"):
        trainer(max_steps=1).fit(bare, DataLoader(data(1), batch_size=BATCH))
    manual = Net("ls")
    manual.automatic_optimization = False
    with pytest.raises(InvalidModelError, match="automatic_optimization = True"):
        trainer(max_steps=1).fit(manual, DataLoader(data(1), batch_size=BATCH))


def test_without_lightning_the_import_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)  # an import of it now raises ImportError
    monkeypatch.delitem(sys.modules, "mtlzoo.lightning")
    with pytest.raises(ImportError, match=r"mtlzoo\[lightning\]"):
        importlib.import_module("mtlzoo.lightning")


def test_no_other_module_of_mtlzoo_imports_lightning() -> None:
    package = Path(mtlzoo.__file__).parent
    for path in package.rglob("*.py"):
        if path.name == "lightning.py" and path.parent == package:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(name.split(".")[0] in ("lightning", "pytorch_lightning") or name == "mtlzoo.lightning"
                           for name in names), f"{path} imports {names}: import mtlzoo must not need the extra"


def test_the_docs_example_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mktestdocs = pytest.importorskip("mktestdocs", reason="the docs extra: python -m pip install -e '.[docs]'")
    page = Path(__file__).resolve().parent.parent / "docs" / "lightning.md"
    monkeypatch.chdir(tmp_path)  # whatever Lightning writes beside its root
    mktestdocs.check_md_file(page, memory=True)
