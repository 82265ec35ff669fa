"""``MTLWrapper``: one training step of a hard-parameter-sharing model under any strategy."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from mtlzoo.autograd import accumulate_grads, parameter_jacobian, representation_grads
from mtlzoo.errors import BackwardOrderError, InvalidModelError, ShapeMismatchError
from mtlzoo.losses import Losses, check_backbone_loss, loss_vector
from mtlzoo.registry import create
from mtlzoo.strategy import Strategy

BACKBONE_EXTRAS = "backbone"
"""Key of the backbone's extra outputs in the extras dict of a model with named heads."""


def _split(output: Any) -> tuple[Any, tuple[Any, ...] | None]:
    """``(first, rest)`` of a tuple/list output, ``(output, None)`` otherwise."""
    if isinstance(output, (tuple, list)):
        return output[0], tuple(output[1:])
    return output, None


class HardSharing(nn.Module):
    """A shared ``backbone`` and one head per task, for users who hold the parts.

    Args:
        backbone: The shared module; its output (or the first element of a tuple) is ``z``.
        heads: One module per task: a sequence, or a mapping from task name to head.

    Calling it runs every head on the backbone output, with no strategy involved.
    """

    def __init__(self, backbone: nn.Module, heads: Sequence[nn.Module] | Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict(heads) if isinstance(heads, Mapping) else nn.ModuleList(heads)

    def forward(self, *args: Any, **kwargs: Any) -> list[Any] | dict[str, Any]:
        z, _ = _split(self.backbone(*args, **kwargs))
        if isinstance(self.heads, nn.ModuleDict):
            return {name: head(z) for name, head in self.heads.items()}
        return [head(z) for head in self.heads]


class TaskModel(nn.Module):
    """End-to-end model of one task: backbone, the strategy's transform for it, its head."""

    def __init__(self, backbone: nn.Module, strategy: Strategy, task: int, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head
        self.task = task
        object.__setattr__(self, "strategy", strategy)  # shared, not owned: keep it out of this state_dict

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        z, _ = _split(self.backbone(*args, **kwargs))
        with parametrize.cached():
            return self.head(self.strategy.adapt(z, self.task))


@dataclass
class _StepRecord:
    """What a training forward leaves for the backward of the same step."""

    z: Tensor
    leaves: list[Tensor]


class MTLWrapper(nn.Module):
    """Train a hard-parameter-sharing model with a multitask-learning strategy.

    Args:
        model: Any module with a ``backbone`` module and ``heads`` (a sequence, ``nn.ModuleList``
            or, for named tasks, a mapping / ``nn.ModuleDict``). The wrapper registers the same
            backbone and head objects as its own submodules; nothing of the model is modified.
        strategy: A registered strategy name (``"rotograd"``, ``"ls"``, ...; see ``mtlzoo list``)
            or a :class:`~mtlzoo.strategy.Strategy` instance built for ``len(heads)`` tasks.
        **strategy_kwargs: Hyperparameters of the named strategy (``rotation_shape=...``).

    Example:
        ```python
        mtl = MTLWrapper(HardSharing(backbone, [head1, head2]), "rotograd", rotation_shape=16)
        opt = torch.optim.Adam([{"params": mtl.model_parameters()},
                                {"params": mtl.strategy_parameters(), "lr": 1e-4}], lr=1e-3)
        with mtlzoo.cached():
            y1, y2 = mtl(x)
            mtl.backward([loss1(y1, t1), loss2(y2, t2)])
        opt.step()
        ```
    """

    def __init__(self, model: nn.Module, strategy: str | Strategy, **strategy_kwargs: Any) -> None:
        super().__init__()
        backbone = getattr(model, "backbone", None)
        heads = getattr(model, "heads", None)
        if not isinstance(backbone, nn.Module):
            raise InvalidModelError(f"The model should have a `backbone` attribute holding an nn.Module. "
                                    f"Found {type(backbone).__name__}. Wrap the parts with "
                                    "mtlzoo.HardSharing(backbone, heads).")
        if isinstance(heads, (nn.ModuleList, nn.ModuleDict)):
            pass
        elif isinstance(heads, Mapping):
            heads = nn.ModuleDict(heads)
        elif isinstance(heads, Sequence) and not isinstance(heads, str):
            heads = nn.ModuleList(heads)
        else:
            raise InvalidModelError(f"The model should have `heads`: a sequence or mapping of nn.Modules, one per "
                                    f"task. Found {type(heads).__name__}.")
        if len(heads) == 0:
            raise InvalidModelError("The model has no heads; a multitask model needs one head per task.")
        bad = [str(k) for k, head in (heads.items() if isinstance(heads, nn.ModuleDict) else enumerate(heads))
               if not isinstance(head, nn.Module)]
        if bad:
            raise InvalidModelError(f"Every head should be an nn.Module; heads {bad} are not.")
        self.backbone = backbone
        self.heads = heads
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
        self.strategy = strategy
        self._record: _StepRecord | None = None

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
        """End-to-end module of one task (backbone, the strategy's transform, the head), for evaluation."""
        index = self._task_index(task)
        return TaskModel(self.backbone, self.strategy, index, self._head_items()[index][1])

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

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        """All parameters; raises like :meth:`strategy_parameters` while the strategy has none yet."""
        self.strategy.check_ready()
        return super().parameters(recurse)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``nn.Module.zero_grad``, also before a lazily shaped strategy has its parameters."""
        for part in (self.backbone, self.heads, self.strategy):
            nn.Module.zero_grad(part, set_to_none)

    # ------------------------------------------------------------------ forward
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the backbone and every head: one prediction per task.

        Returns:
            A list of predictions (a dict when heads are named). If the backbone or a head returns a
            tuple, its first element is the representation or prediction and the rest are extras,
            and the result is ``(predictions, extras)``: a list with the backbone's extras followed
            by one tuple per head that had extras, or with named heads a dict keyed by task name
            (the backbone's under ``"backbone"``).
        """
        record = self.training and torch.is_grad_enabled() and self.strategy.needs != "losses"
        if record and self._record is not None:
            warnings.warn("A training forward ran again before backward() consumed the previous one: backward() "
                          "uses the latest forward only, so losses of the earlier one would not reach the backbone. "
                          "Call backward() once per forward (accumulate over micro-batches by alternating them).",
                          RuntimeWarning, stacklevel=2)
        z, backbone_extras = _split(self.backbone(*args, **kwargs))
        leaves: list[Tensor] = []
        predictions: list[Any] = []
        head_extras: list[tuple[str | int, tuple[Any, ...]]] = []
        with parametrize.cached():
            for index, (key, head) in enumerate(self._head_items()):
                z_task = z
                if record:
                    z_task = z.detach().requires_grad_()
                    leaves.append(z_task)
                prediction, extras = _split(head(self.strategy.adapt(z_task, index)))
                predictions.append(prediction)
                if extras is not None:
                    head_extras.append((key, extras))
        self._record = _StepRecord(z, leaves) if record else None

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
    def backward(self, losses: Losses, backbone_loss: Tensor | None = None, *, retain_graph: bool = False) -> None:
        """Back-propagate the K task losses of this step through the strategy.

        Gradients are accumulated into ``.grad`` of the model and strategy parameters; call
        ``optimizer.step()`` afterwards as usual.

        Args:
            losses: K scalar losses: a list or tuple in head order, a dict keyed by task name, or a
                1-D tensor.
            backbone_loss: An optional loss of the backbone alone (a regulariser), back-propagated
                into the backbone as is (after the strategy's ``prepare``).
            retain_graph: Keep the graph for another backward.

        Raises:
            LossError: Not K finite scalars (nothing is back-propagated and no state changes).
            BackwardOrderError: Not in training mode, or no training forward since the last backward.
        """
        if not self.training:
            raise BackwardOrderError("backward() is for training: call mtl.train() first (in eval mode the "
                                     "forward records nothing to back-propagate).")
        vector = loss_vector(losses, self.task_names, len(self))
        if backbone_loss is not None:
            check_backbone_loss(backbone_loss)
        needs = self.strategy.needs
        record = self._record
        if needs != "losses" and record is None:
            raise BackwardOrderError("No training forward since the last backward: call mtl(x) with gradients "
                                     "enabled, compute the losses from its predictions, then backward.")
        self._record = None

        with parametrize.cached():
            prepared, backbone_loss = self.strategy.prepare(vector, backbone_loss)
            if needs == "losses":
                total = self.strategy.combine(prepared)
                if backbone_loss is not None:
                    total = total + backbone_loss
                total.backward(retain_graph=retain_graph)
                return
            assert record is not None
            grads = representation_grads(prepared, record.leaves, retain_graph=retain_graph)
            if needs == "representation_grads":
                self._backward_representation(record.z, grads, prepared.detach(), backbone_loss, retain_graph)
            else:
                self._backward_parameters(record.z, grads, prepared.detach(), backbone_loss, retain_graph)

    def _backward_representation(self, z: Tensor, grads: Tensor, losses: Tensor, backbone_loss: Tensor | None,
                                 retain_graph: bool) -> None:
        dz = self.strategy.aggregate(grads, losses)
        if dz.shape != z.shape:
            raise ShapeMismatchError(f"{type(self.strategy).__name__}.aggregate returned shape {tuple(dz.shape)}; "
                                     f"the representation has shape {tuple(z.shape)}.")
        tensors, grad_tensors = [], []
        if z.requires_grad:
            tensors.append(z)
            grad_tensors.append(dz)
        if backbone_loss is not None:
            tensors.append(backbone_loss)
            grad_tensors.append(None)
        if tensors:
            torch.autograd.backward(tensors, grad_tensors, retain_graph=retain_graph)

    def _backward_parameters(self, z: Tensor, grads: Tensor, losses: Tensor, backbone_loss: Tensor | None,
                             retain_graph: bool) -> None:
        params = [p for p in self.backbone.parameters() if p.requires_grad]
        if params and z.requires_grad:
            jacobian = parameter_jacobian(z, grads, params)
            update = self.strategy.aggregate(jacobian, losses)
            if update.shape != jacobian.shape[1:]:
                raise ShapeMismatchError(f"{type(self.strategy).__name__}.aggregate returned shape "
                                         f"{tuple(update.shape)} for a {tuple(jacobian.shape)} Jacobian.")
            accumulate_grads(params, update)
        if backbone_loss is not None:
            backbone_loss.backward(retain_graph=retain_graph)
