"""``MTLWrapper``: one training step of a hard-parameter-sharing model under any strategy.

The wrapper adapts the model (which parts are shared, which belong to a task) and holds the user
API; the engine (:mod:`mtlzoo.engine`) holds the autograd, and the strategy its maths and state.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from mtlzoo.engine.accumulation import StepBuffer, check_aggregate_at
from mtlzoo.engine.collectives import running
from mtlzoo.engine.distributed import DataParallel, strategy_names
from mtlzoo.engine.forwards import ForwardRecord, MarkedForward, PendingForwards, mark
from mtlzoo.engine.internals import compiled_original, parameters_of, without_donated_buffers
from mtlzoo.engine.jacobian import JacobianRoute
from mtlzoo.engine.lifecycle import StepTracker, run_optimizers
from mtlzoo.engine.step import backpropagate, transaction
from mtlzoo.errors import BackwardOrderError, InvalidModelError
from mtlzoo.linalg import widened
from mtlzoo.losses import Losses, check_backbone_loss, loss_vector
from mtlzoo.protocol import StepInputs, StepWeights
from mtlzoo.registry import create
from mtlzoo.sharing import BACKBONE_EXTRAS, TaskModel, as_heads, detached_leaves, split_output
from mtlzoo.strategy import Strategy


class MTLWrapper(nn.Module):
    """Train a hard-parameter-sharing model with a multitask-learning strategy.

    Args:
        model: Any module with a ``backbone`` module and ``heads`` (a sequence, ``nn.ModuleList`` or, for named
            tasks, a mapping / ``nn.ModuleDict``). The wrapper registers the same backbone and head objects as its
            own submodules; nothing of the model is modified. When all of the model's tensors are on one device
            (``model.cuda()`` first), the strategy's state is moved there too; otherwise use ``mtl.to(...)``.
        strategy: A registered strategy name (``"rotograd"``, ``"ls"``, ...; see ``mtlzoo list``) or a
            :class:`~mtlzoo.strategy.Strategy` instance built for ``len(heads)`` tasks.
        jacobian_chunk_size: Tasks per vmapped backward when a strategy reads the Jacobian on the shared
            parameters: ``1`` loops over tasks; ``None`` (the default) loops on the CPU, where the loop was measured
            faster (docs/performance.md), and batches all K at once on an accelerator. A chunk bounds the batched
            backward's working memory, not the K x n Jacobian ("Memory and jacobian_chunk_size" below).
        distributed: Data-parallel training (docs/distributed.md): ``None`` (the default) trains on the whole
            batch of every rank when ``torch.distributed`` is initialized with more than one process, ``False``
            trains on this process's batch alone, ``True`` or a process group: on that group (the default one).
        aggregate_at: Where a strategy that reads gradients on the shared parameters aggregates them:
            ``"backward"`` (the default): at each backward, over that micro-batch's gradients; ``"step"``: once,
            in :meth:`step`, over the per-task gradients summed over the step's micro-batches (a K x n buffer):
            the whole batch's step (docs/concepts.md, "Aggregating at the step"). Refused for strategies that read
            the losses only or the representation, and under ``torch.distributed``.
        **strategy_kwargs: Hyperparameters of the named strategy (``rotation_shape=...``).

    One training step (see "How a step works" in the README)::

        optimizer.zero_grad()
        predictions = mtl(x)                      # any number of forwards; each is its own handle
        mtl.backward(losses(predictions))         # once per forward (micro-batches accumulate)
        mtl.step(optimizer)                       # instead of optimizer.step(): the strategy's state
                                                  # advances once, after a step that was taken
    """

    def __init__(self, model: nn.Module, strategy: str | Strategy, *, jacobian_chunk_size: int | None = None,
                 distributed: Any = None, aggregate_at: str = "backward", **strategy_kwargs: Any) -> None:
        super().__init__()
        self._parallel = DataParallel(distributed)
        if jacobian_chunk_size is not None and (isinstance(jacobian_chunk_size, bool)
                                                or not isinstance(jacobian_chunk_size, int) or jacobian_chunk_size < 1):
            raise ValueError(f"Parameter `jacobian_chunk_size` should be a positive int or None. Found "
                             f"`jacobian_chunk_size = {jacobian_chunk_size!r}`.")
        self.jacobian_chunk_size = jacobian_chunk_size
        if compiled_original(model) is not None:
            warnings.warn("MTLWrapper(torch.compile(model)) compiles nothing: the wrapper calls model.backbone and "
                          "model.heads, never the compiled model's forward. Compile the backbone instead: "
                          "model.backbone = torch.compile(model.backbone), or "
                          "mtlzoo.HardSharing(torch.compile(backbone), heads).", RuntimeWarning, stacklevel=2)
        backbone = getattr(model, "backbone", None)
        if not isinstance(backbone, nn.Module):
            raise InvalidModelError(f"The model should have a `backbone` attribute holding an nn.Module. "
                                    f"Found {type(backbone).__name__}. Wrap the parts with "
                                    "mtlzoo.HardSharing(backbone, heads).")
        heads = as_heads(getattr(model, "heads", None))
        if len(heads) == 0:
            raise InvalidModelError("The model has no heads; a multitask model needs one head per task.")
        self.backbone = backbone
        self.heads = heads
        self._compiled_backbone = compiled_original(backbone) is not None
        self.task_names: list[str] | None = list(heads.keys()) if isinstance(heads, nn.ModuleDict) else None

        if isinstance(strategy, Strategy):
            if strategy_kwargs:
                raise TypeError(f"Strategy keyword arguments {sorted(strategy_kwargs)} were given with a strategy "
                                "instance; pass them to its constructor instead.")
            if strategy.num_tasks != len(heads):
                raise ValueError(f"The strategy was built for {strategy.num_tasks} tasks, but the model has "
                                 f"{len(heads)} heads.")
        elif isinstance(strategy, str):
            strategy = create(strategy, num_tasks=len(heads), **strategy_kwargs)
        else:
            raise TypeError(f"`strategy` should be a registered name or a Strategy instance. "
                            f"Found {type(strategy).__name__}.")
        device = _single_device(backbone, heads)
        if device is not None:  # a model already on its device: the strategy's state joins it
            strategy.to(device)
        self.strategy = strategy
        self.aggregate_at = check_aggregate_at(aggregate_at)
        self._buffer = StepBuffer(strategy) if aggregate_at == "step" else None
        if self._buffer is not None:
            self.register_state_dict_pre_hook(self._buffer.refuse_saving)
        self._pending = PendingForwards()
        self._tracker = StepTracker(self._watched_parameters)
        self._route = JacobianRoute()
        self._warned: set[str] = set()
        self.last_step: StepWeights | None = None
        """What the last :meth:`backward` used per task: its loss weights and gradient coefficients
        (:class:`~mtlzoo.protocol.StepWeights`), for logging; ``None`` before the first backward."""

    # ---------------------------------------------------------------- the model
    def __len__(self) -> int:
        """The number of tasks K."""
        return len(self.heads)

    def _head_items(self) -> list[tuple[str | int, nn.Module]]:
        if self.task_names is not None:
            return list(self.heads.items())
        return list(enumerate(self.heads))

    def _task_index(self, task: int | str) -> int:
        if self.task_names is not None and isinstance(task, str):
            if task not in self.task_names:
                raise KeyError(f"Unknown task {task!r}; the tasks are {self.task_names}.")
            return self.task_names.index(task)
        if isinstance(task, int) and not isinstance(task, bool) and -len(self) <= task < len(self):
            return task % len(self)
        raise KeyError(f"Unknown task {task!r}: use an index in [0, {len(self)})"
                       + (f" or a name in {self.task_names}." if self.task_names else "."))

    def __getitem__(self, task: int | str) -> TaskModel:
        """End-to-end module of one task (backbone, its rotation or other transform, its head).

        It shares its parts with the wrapper: train through the wrapper, save or serve it alone.
        """
        index = self._task_index(task)
        return TaskModel(self.backbone, self.strategy.task_transform(index), self._head_items()[index][1])

    def model_parameters(self) -> Iterator[nn.Parameter]:
        """The backbone's and heads' parameters (for the model's optimizer group)."""
        seen: set[int] = set()
        for module in (self.backbone, self.heads):
            for param in module.parameters():
                if id(param) not in seen:
                    seen.add(id(param))
                    yield param

    def strategy_parameters(self) -> list[nn.Parameter]:
        """The strategy's own learnable parameters (rotations, task weights), for their own group.

        Raises:
            NotMaterializedError: The strategy creates them at the first forward (RotoGrad without
                ``rotation_shape``); pass the shape, or run one forward before building the optimizer.
        """
        self.strategy.check_ready()
        return list(self.strategy.parameters())

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``nn.Module.zero_grad``."""
        for part in (self.backbone, self.heads, self.strategy):
            nn.Module.zero_grad(part, set_to_none)
        if self._buffer is not None:  # the step's buffered micro-batches go with their gradients
            self._buffer.clear()

    # ------------------------------------------------------------------ forward
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the backbone and every head: one prediction per task.

        Each training forward (training mode, gradients enabled) is its own handle: the losses of its predictions find
        it at ``backward``, whatever forwards ran in between (a ``no_grad`` validation forward changes nothing).

        Returns:
            A list of predictions (a dict when heads are named). If the backbone or a head returns a
            tuple, its first element is the representation or prediction and the rest are extras,
            and the result is ``(predictions, extras)``: a list with the backbone's extras followed
            by one tuple per head that had extras, or with named heads a dict keyed by task name
            (the backbone's under ``"backbone"``). The backbone's extras may enter the losses: their
            gradients reach the backbone on every path, beside the strategy's combined gradient.
        """
        training = self.training and torch.is_grad_enabled()
        if training:
            self._parallel.forward_started(self)
        record = training and self.strategy.request.needs_gradients
        if training and self._compiled_backbone:  # its graph must serve the Jacobian's backwards and the step's
            with without_donated_buffers():
                z, backbone_extras = split_output(self.backbone(*args, **kwargs))
        else:
            z, backbone_extras = split_output(self.backbone(*args, **kwargs))
        if training and not record:
            if isinstance(z, Tensor) and z.is_floating_point():
                z, marker = mark(z)  # the heads read z + 0: the losses' backward can tell this forward's
                self._pending.add(MarkedForward.create(marker))
            else:
                self._pending.unmarked = True
        leaves: list[Tensor] = []
        predictions: list[Any] = []
        head_extras: list[tuple[str | int, tuple[Any, ...]]] = []
        extra_roots: list[Tensor] = []
        extra_leaves: list[Tensor] = []
        if record and backbone_extras is not None:
            backbone_extras = detached_leaves(backbone_extras, extra_roots, extra_leaves)
        with parametrize.cached():
            for index, (key, head) in enumerate(self._head_items()):
                z_task = z
                if record:
                    z_task = z.detach().requires_grad_()
                    leaves.append(z_task)
                prediction, extras = split_output(self.strategy.predict(head, z_task, index))
                predictions.append(prediction)
                if extras is not None:
                    head_extras.append((key, extras))
        if record and z.requires_grad:
            self._pending.add(ForwardRecord.create(z, leaves, extra_roots, extra_leaves))

        if self.task_names is not None:
            named = dict(zip(self.task_names, predictions))
            if backbone_extras is None and not head_extras:
                return named
            if backbone_extras is not None and BACKBONE_EXTRAS in self.task_names:
                raise InvalidModelError(f"A task is named {BACKBONE_EXTRAS!r}, the key of the backbone's extra "
                                        "outputs; rename the task.")
            extras_dict: dict[str, Any] = dict(head_extras)
            if backbone_extras is not None:
                extras_dict = {BACKBONE_EXTRAS: backbone_extras, **extras_dict}
            return named, extras_dict
        if backbone_extras is None and not head_extras:
            return predictions
        return predictions, [*(backbone_extras or ()), *(extras for _, extras in head_extras)]

    # ----------------------------------------------------------------- backward
    def backward(self, losses: Losses, backbone_loss: Tensor | None = None, *, more_batches: Sequence[Losses] = (),
                 scaler: Any | None = None, retain_graph: bool = False) -> None:
        """Back-propagate the K task losses of this step through the strategy.

        Gradients accumulate into ``.grad`` through autograd (hooks fire as after a plain backward). Call it once per
        forward, then :meth:`step` (a plain ``optimizer.step()`` in between is noticed here and advances the state,
        with a one-time warning). The model learns from ``sum_k w_k L_k`` (``w`` all ones for surgery); a surgery
        strategy then combines the per-task gradients on the shared part. A ``None`` loss leaves its task out of the
        step (no gradient to its head, no row for the strategy); a loss that does not depend on the model gives its
        task a zero gradient, with a warning. What the backward used is in :attr:`last_step` afterwards.

        Args:
            losses: K scalar losses (``None`` for an absent task): a list or tuple in head order, a dict keyed by
                task name, or a 1-D tensor.
            backbone_loss: An optional loss of the backbone alone (a regulariser), back-propagated into the backbone
                as is (RotoGrad with ``normalize_losses`` normalises it too).
            more_batches: For a strategy whose request reads ``batches > 1`` independent batches (SDMGrad, MoDo): the
                losses of the other ``batches - 1`` batches, each from forwards of its own. The strategy reads their
                statistics (``inputs.extra``); the model learns from ``losses`` alone. Given fewer, the given batches
                stand in for the missing ones, with a :class:`~mtlzoo.errors.ReusedBatchWarning` (once).
            scaler: The ``torch.amp.GradScaler`` of a mixed-precision loop: the losses are checked and the strategy
                computes unscaled, and what reaches ``.grad`` is scaled, as ``scaler.scale(loss).backward()`` would
                leave it. Pass the same scaler to :meth:`step`.
            retain_graph: Keep the graph for another backward.

        Raises:
            LossError: Not K finite scalars (nothing is back-propagated and no state changes).
            BackwardOrderError: Not in training mode, or losses that no pending forward produced.
            NonFiniteGradientError: Finite losses whose gradients overflow (without a scaler).
        """
        if not self.training:
            raise BackwardOrderError("backward() is for training: call mtl.train() first (in eval mode the "
                                     "forward records nothing to back-propagate).")
        sync = self._parallel.sync()
        wanted = self.strategy.request.batches - 1
        with sync.refusals(sync.share_size(len(self), wanted + 1)):
            step_losses = loss_vector(losses, self.task_names, len(self))
            extra_losses = [loss_vector(more, self.task_names, len(self)) for more in more_batches]
            if len(extra_losses) > wanted:
                raise BackwardOrderError(f"{type(self.strategy).__name__} reads {wanted + 1} independent batch(es) per "
                                         f"backward, but {len(extra_losses) + 1} were given: pass at most {wanted} as "
                                         "more_batches=[...], each from a forward of its own.")
            if backbone_loss is not None:
                check_backbone_loss(backbone_loss)
        self._warn_constant_losses(step_losses.present, step_losses.requires_grad, step_losses.labels)
        # under torch.distributed the whole batch's losses (a task absent here but present elsewhere: 0 here)
        step_losses, extra_losses = sync.share(step_losses, extra_losses, backbone_loss, self._head_parameters)
        if self._buffer is not None:  # aggregate_at="step": summed here, aggregated in step()
            with parametrize.cached():
                self._buffer.add(self.strategy, self._pending, self.heads, self.backbone, step_losses, extra_losses,
                                 tracker=self._tracker, active=sync.active, backbone_loss=backbone_loss, scaler=scaler,
                                 retain_graph=retain_graph, chunk_size=self.jacobian_chunk_size, route=self._route)
            return
        if self._tracker.stepped_outside():  # a plain optimizer.step() since the last backward
            self._commit_step()
        def body(inputs: StepInputs, scale: Tensor | None) -> StepWeights:
            with parametrize.cached():
                return backpropagate(self.strategy, self._pending, self.heads, self.backbone, step_losses, inputs,
                                     backbone_loss=backbone_loss, extra_losses=extra_losses, scale=scale,
                                     retain_graph=retain_graph, chunk_size=self.jacobian_chunk_size, route=self._route)

        with running(sync):
            self.__dict__["last_step"] = transaction(self.strategy, step_losses, scaler, body)  # no Module.__setattr__
        self._tracker.backward_done(step_losses.present)

    def _warn_constant_losses(self, tasks: list[int], requires_grad: list[bool], labels: list[str]) -> None:
        """Warn about a loss that does not depend on the model: once per task for a strategy that reads only the
        losses (the task adds nothing to the sum), at every such backward for one that reads gradients (a zero
        row changes its update: MGDA's can vanish, UPGrad's and RotoGrad's shrink)."""
        constant = [labels[task] for task, requires in zip(tasks, requires_grad) if not requires]
        if not constant:
            return
        if self.strategy.request.needs_gradients:
            name = type(self.strategy).__name__
            warnings.warn(f"The losses of tasks {', '.join(constant)} do not depend on the model (a constant, or "
                          f"detached): they get a zero gradient, which changes the update of {name} (a zero task "
                          "gradient can stall MGDA's update and shrinks UPGrad's, DualProj's and RotoGrad's). For a "
                          "masked task with no labels in the batch, give None instead of its loss to leave it out of "
                          "the step; otherwise look for a stray .detach(). Said at every such backward.",
                          RuntimeWarning, stacklevel=3)
            return
        for label in constant:
            if label not in self._warned:
                self._warned.add(label)
                warnings.warn(f"The loss of task {label} does not depend on the model (a constant, or detached): "
                              "that task gets a zero gradient in this step. That is what a masked task with no "
                              "labels in the batch needs; otherwise look for a stray .detach(). (Give None instead "
                              "to leave the task out of the step.) Said once per task.", RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------- lifecycle
    def step(self, *optimizers: torch.optim.Optimizer, scaler: Any | None = None,
             post_step_losses: Callable[[], Losses] | None = None) -> bool:
        """Step the optimizers (through ``scaler``), then advance the strategy's state once.

        Use it instead of ``optimizer.step()`` (and ``scaler.step(optimizer); scaler.update()``): a
        step that the scaler skips leaves the strategy's state as it was, and the state advances
        once per step, however many micro-batches were accumulated.

        Args:
            *optimizers: Every optimizer of the step (the model's, the strategy parameters' if apart).
            scaler: The ``GradScaler`` of a mixed-precision loop (it is stepped and updated here).
            post_step_losses: For strategies that read the losses after the step (FAMO): a callable
                returning the step's losses re-evaluated on the same batch; it runs under
                ``torch.no_grad()`` only when the strategy needs it.

        Returns:
            Whether the step was taken (``False`` when the scaler skipped it).
        """
        if not optimizers:
            raise TypeError("mtl.step() takes the optimizer(s) to step: mtl.step(optimizer).")
        self._check_optimizer_groups(optimizers)
        if self._buffer is not None:
            with parametrize.cached():
                self.last_step = self._buffer.write(self.strategy, self.heads) or self.last_step
            self._buffer.clear()
        taken = run_optimizers(optimizers, scaler)
        if not taken:
            self.strategy.discard()
            self._tracker.close()
            return False
        self._commit_step()
        if self.strategy.wants_post_step_losses:
            if post_step_losses is None:
                self._warn_once("post_step", f"{type(self.strategy).__name__} reads the losses after the optimizer "
                                "step: pass post_step_losses=lambda: losses(mtl(x), y) to mtl.step().")
            else:
                sync = self._parallel.sync()
                with sync.refusals(2 * len(self) + 1), torch.no_grad():
                    after = loss_vector(post_step_losses(), self.task_names, len(self), require_grad=False)
                values = widened(after.values.detach())
                if len(after.present) < len(self):
                    absent = torch.full((len(self),), float("nan"), dtype=values.dtype, device=values.device)
                    values = absent.index_copy(0, after.tasks, values)
                self.strategy.post_step(sync.post_step(values))
        return True

    def _commit_step(self) -> None:
        self.strategy.advance()
        self._tracker.close()
        self._parallel.step_taken(self)

    def _head_parameters(self, task: int) -> list[Tensor]:
        return list(self._head_items()[task][1].parameters())

    @property
    def _ddp_params_and_buffers_to_ignore(self) -> list[str]:
        """What ``DistributedDataParallel(mtl)`` leaves out: the strategy's parameters and buffers, which the engine
        keeps the same on every rank (``mtlzoo.engine.distributed``); read by DDP's constructor."""
        return [*strategy_names(self), *self.__dict__.get("_ddp_also_ignored", [])]

    @_ddp_params_and_buffers_to_ignore.setter
    def _ddp_params_and_buffers_to_ignore(self, names: Sequence[str]) -> None:
        self.__dict__["_ddp_also_ignored"] = [name for name in names if name not in strategy_names(self)]

    def _watched_parameters(self, present: Sequence[int]) -> list[Tensor]:
        """A parameter that an optimizer step writes after a backward of the tasks ``present``: the first trainable
        one of the first present task's head (it gets a gradient), else the wrapper's first trainable one."""
        head = self._head_items()[present[0]][1] if present else self
        for module in (head, self):
            found = next((p for p in parameters_of(module) if p.requires_grad), None)
            if found is not None:
                return [found]
        return []

    def end_epoch(self) -> None:
        """Mark the end of an epoch, for strategies that work per epoch (DWA, STCH)."""
        self.strategy.end_epoch()

    def _check_optimizer_groups(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        if self._tracker.checked_groups:
            return
        self._tracker.checked_groups = True
        stepped = {id(p) for optimizer in optimizers for group in optimizer.param_groups for p in group["params"]}
        missing = [p for p in self.strategy.parameters() if p.requires_grad and id(p) not in stepped]
        if missing:
            self._warn_once("groups", f"{len(missing)} parameters of {type(self.strategy).__name__} are in none of "
                            "the optimizers given to mtl.step(): they will not learn. Add a group with "
                            "mtl.strategy_parameters() (run one forward first if the strategy is lazily shaped).")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """As ``nn.Module.load_state_dict``, after checking the strategy's settings against the checkpoint's.

        Raises:
            CheckpointMismatchError: The checkpoint was saved with other strategy settings (nothing is loaded).
        """
        self.strategy.check_settings(state_dict, prefix="strategy.")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("aggregate_at", "backward")  # pickled before aggregate_at existed
        self.__dict__.setdefault("_buffer", None)
        self._pending = PendingForwards()
        self._tracker = StepTracker(self._watched_parameters)
        self._route = JacobianRoute()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {key: value for key, value in dict(state).items() if key not in ("_pending", "_tracker", "_route")}


def _single_device(*modules: nn.Module) -> torch.device | None:
    """The one device every parameter and buffer of ``modules`` is on, or ``None`` (none, or several)."""
    devices = {tensor.device for module in modules for tensor in (*module.parameters(), *module.buffers())}
    return devices.pop() if len(devices) == 1 else None
