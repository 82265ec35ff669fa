"""PyTorch Lightning (``mtlzoo[lightning]``): a ``LightningModule`` whose ``training_step`` returns the K losses.

The Trainer keeps its automatic optimization (precision and its ``GradScaler``, ``accumulate_grad_batches``,
gradient clipping, checkpoints, loggers): :class:`MTLModule` overrides the hooks Lightning documents for a
custom backward and step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

try:
    import lightning.pytorch as pl
except ImportError as error:  # pragma: no cover - the extra is installed wherever the tests run
    raise ImportError('mtlzoo.lightning needs PyTorch Lightning: python -m pip install "mtlzoo[lightning]"') from error

from mtlzoo.errors import InvalidModelError, LossError
from mtlzoo.linalg import widened
from mtlzoo.losses import Losses, StepLosses, loss_vector
from mtlzoo.protocol import StepWeights
from mtlzoo.wrapper import MTLWrapper

__all__ = ["MTLModule"]


class MTLModule(pl.LightningModule):
    """A ``LightningModule`` trained through an :class:`~mtlzoo.MTLWrapper`: ``training_step`` returns the K losses.

    Assign the wrapper as ``self.mtl`` in ``__init__``, return the K task losses from ``training_step`` (a list in
    head order, or a dict keyed by task name; ``None`` for a task absent from the batch), and build the optimizer from
    :meth:`param_groups`. ``backward`` runs ``mtl.backward`` (through the precision plugin's ``GradScaler``, each
    micro-batch's losses divided by ``accumulate_grad_batches``), ``optimizer_step`` runs ``mtl.step`` around
    Lightning's own step (the state advances only if it was taken), ``on_train_epoch_end`` runs ``mtl.end_epoch()``
    and :meth:`log_mtl_step` logs each task's loss, loss weight and coefficient; the details (FAMO's post-step
    losses, checkpoints, DDP) are in docs/lightning.md. The strategy is a submodule, so a checkpoint holds its whole
    state. Call ``super()`` when overriding ``backward``, ``optimizer_step``, ``on_train_epoch_end``,
    ``load_state_dict`` or ``log``.
    """

    mtl: MTLWrapper

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._mtl_inner = False  # a training_step call that returns the user's losses as they are
        self._mtl_quiet = False
        self._mtl_losses: tuple[Losses, StepLosses] | None = None
        self._mtl_batches: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        step = cls.__dict__.get("training_step")
        if step is not None and not getattr(step, "_mtlzoo_losses", False):
            cls.training_step = _takes_losses(step)

    def param_groups(self, strategy_lr: float | None = None) -> list[dict[str, Any]]:
        """Parameter groups for ``configure_optimizers``: every other parameter, then the strategy's own.

        Args:
            strategy_lr: The learning rate of the strategy's group (RotoGrad's rotations, UW's
                log-variances); ``None`` keeps the optimizer's.
        """
        own = self._wrapper().strategy_parameters()
        ids = {id(p) for p in own}
        groups: list[dict[str, Any]] = [{"params": [p for p in self.parameters() if id(p) not in ids]}]
        if own:
            groups.append({"params": own} if strategy_lr is None else {"params": own, "lr": strategy_lr})
        return groups

    def log_mtl_step(self, losses: StepLosses, used: StepWeights) -> None:
        """Log one backward's losses (as ``training_step`` returned them) and what the strategy used, per task.

        Keys ``loss/<task>``, ``weight/<task>`` (the loss weight ``w``) and ``coefficient/<task>`` (the
        gradient coefficient ``c``, where the strategy has one), on every step. Override it to log
        otherwise, or as ``pass`` to log nothing.
        """
        values: dict[str, Tensor] = {f"loss/{losses.labels[k]}": value
                                     for k, value in zip(losses.present, losses.values.detach())}
        coefficients = used.coefficients
        for k, label in enumerate(losses.labels):
            values[f"weight/{label}"] = used.loss_weights[k]
            if coefficients is not None:
                values[f"coefficient/{label}"] = coefficients[k]
        self.log_dict(values, on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ Lightning's hooks
    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """Back-propagate the losses ``training_step`` returned through the strategy (``loss`` is their sum)."""
        if self._mtl_losses is None:
            raise LossError("MTLModule.backward found no task losses: return them from training_step.")
        (losses, checked), self._mtl_losses = self._mtl_losses, None
        micro_batches = self.trainer.accumulate_grad_batches
        mtl = self._wrapper()
        mtl.backward(_divided(losses, micro_batches), scaler=getattr(self.trainer.precision_plugin, "scaler", None))
        self.log_mtl_step(checked, mtl.last_step)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any,
                       optimizer_closure: Callable[[], Any] | None = None) -> None:
        """Lightning's optimizer step through ``mtl.step``: the strategy's state advances once it was taken."""
        mtl = self._wrapper()
        post = self._post_step_losses if mtl.strategy.wants_post_step_losses else None
        try:
            mtl.step(getattr(optimizer, "optimizer", optimizer), scaler=_LightningStep(optimizer, optimizer_closure),
                     post_step_losses=post)
        finally:
            self._mtl_batches.clear()

    def on_train_epoch_end(self) -> None:
        self._wrapper().end_epoch()

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """As ``nn.Module.load_state_dict``, after checking the strategy's settings against the checkpoint's."""
        strategy = self._wrapper().strategy
        strategy.check_settings(state_dict, prefix=self._name_of(strategy) + ".")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @property
    def _ddp_params_and_buffers_to_ignore(self) -> list[str]:
        """What ``DistributedDataParallel`` (Lightning's ``ddp``) leaves out of this module: what the wrapper asks
        it to (the strategy's state, which mtlzoo keeps the same on every rank), named from here."""
        mtl = self._wrapper()
        return [f"{self._name_of(mtl)}.{name}" for name in getattr(mtl, "_ddp_params_and_buffers_to_ignore", ())]

    def log(self, *args: Any, **kwargs: Any) -> None:
        if not self._mtl_quiet:
            super().log(*args, **kwargs)

    # ------------------------------------------------------------------ internals
    def _wrapper(self) -> MTLWrapper:
        mtl = self.__dict__.get("_modules", {}).get("mtl")
        if not isinstance(mtl, MTLWrapper):
            raise InvalidModelError(f"{type(self).__name__} should assign its mtlzoo.MTLWrapper as self.mtl in "
                                    f"__init__ (self.mtl = mtlzoo.MTLWrapper(model, strategy)). Found "
                                    f"{type(mtl).__name__}.")
        return mtl

    def _name_of(self, module: nn.Module) -> str:
        return next(name for name, child in self.named_modules() if child is module)

    def _received(self, losses: Losses | None, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Tensor]:
        """Keep a training_step's losses for ``backward``; what Lightning gets: their sum, as its ``loss``."""
        if losses is None:
            raise LossError(f"{type(self).__name__}.training_step returned None; it should return the K task losses "
                            "(None as the loss of a task absent from the batch). Skipping a whole batch would still "
                            "advance the strategy's state at the optimizer step.")
        if not self.automatic_optimization:
            raise InvalidModelError(f"{type(self).__name__} steps through Lightning's automatic optimization (its "
                                    "backward and optimizer_step hooks): leave automatic_optimization = True.")
        mtl = self._wrapper()
        checked = loss_vector(losses, mtl.task_names, len(mtl))
        self._mtl_losses = (losses, checked)
        if mtl.strategy.wants_post_step_losses:
            self._mtl_batches.append((args, kwargs))
        return {"loss": checked.values.detach().sum()}

    def _post_step_losses(self) -> list[Tensor | None]:
        """The step's losses re-evaluated on its micro-batches after the optimizer step (their mean per task)."""
        mtl = self._wrapper()
        sums: list[Tensor | None] = [None] * len(mtl)
        counts = [0] * len(mtl)
        self._mtl_inner = self._mtl_quiet = True
        try:
            with self.trainer.precision_plugin.train_step_context():
                for args, kwargs in self._mtl_batches:
                    losses = self.training_step(*args, **kwargs)
                    after = loss_vector(_divided(losses, self.trainer.accumulate_grad_batches), mtl.task_names,
                                        len(mtl), require_grad=False)
                    for k, value in zip(after.present, widened(after.values)):
                        sums[k] = value if sums[k] is None else sums[k] + value
                        counts[k] += 1
        finally:
            self._mtl_inner = self._mtl_quiet = False
        return [None if total is None else total / count for total, count in zip(sums, counts)]


class _LightningStep:
    """What ``mtl.step`` steps through in place of a ``GradScaler``: Lightning's own optimizer step.

    ``mtl.step`` calls ``scaler.step(optimizer)`` then ``scaler.update()``, and tells a skipped step by
    the optimizer's step hook; Lightning's step runs the closure (``training_step`` and ``backward``),
    then clipping and its precision plugin's scaler, which steps and updates itself.
    """

    def __init__(self, optimizer: Any, closure: Callable[[], Any] | None) -> None:
        self.optimizer, self.closure = optimizer, closure

    def step(self, _optimizer: torch.optim.Optimizer) -> None:
        self.optimizer.step(closure=self.closure)

    def update(self) -> None:
        pass


def _takes_losses(step: Callable[..., Any]) -> Callable[..., Any]:
    """``training_step`` made to keep the K losses it returns for ``backward`` and hand Lightning their sum."""

    @functools.wraps(step)
    def training_step(self: MTLModule, *args: Any, **kwargs: Any) -> Any:
        if self._mtl_inner:  # super().training_step from an override, or FAMO's re-evaluation
            return step(self, *args, **kwargs)
        self._mtl_inner = True
        try:
            losses = step(self, *args, **kwargs)
        finally:
            self._mtl_inner = False
        return self._received(losses, args, kwargs)

    training_step._mtlzoo_losses = True  # type: ignore[attr-defined]
    return training_step


def _divided(losses: Losses, divisor: int) -> Losses:
    """The losses divided by ``divisor`` (``None`` kept), in the structure given."""
    if divisor == 1:
        return losses
    if isinstance(losses, Tensor):
        return losses / divisor
    if isinstance(losses, Mapping):
        return {key: None if loss is None else loss / divisor for key, loss in losses.items()}
    return [None if loss is None else loss / divisor for loss in losses]
