"""Data-parallel training on ``torch.distributed``: every rank takes the step of the whole batch.

DDP's average of the ranks' gradients is the whole batch's gradient for ``sum_k w_k L_k`` with fixed ``w``
only; a strategy's weights, projections and running state are non-linear in what it reads. So the engine makes
what a strategy reads global here, and only here, and every rank computes the whole batch's update from the same
numbers. What is made global, at what cost, how the update reaches ``.grad`` so that DDP's average is the whole
batch's, and what FSDP changes (:meth:`Sync.through_heads`, :meth:`Sync.shard_gramian`): docs/distributed.md.
One process's collectives, and which run now, are :mod:`mtlzoo.engine.collectives`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtlzoo.engine.collectives import LOCAL, Local, SharedLosses
from mtlzoo.engine.internals import is_batch_norm, is_sharded, leaves_reached
from mtlzoo.engine.jacobian import parameter_jacobian
from mtlzoo.errors import DistributedError, MTLZooError, NotMaterializedError
from mtlzoo.linalg import row_norms
from mtlzoo.losses import StepLosses, task_indices
from mtlzoo.protocol import Request, Update

try:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without it
    dist = None  # type: ignore[assignment]
    DTensor = ()  # type: ignore[assignment,misc]

DOCS = "docs/distributed.md"

_SHARED: weakref.WeakSet[nn.Module] = weakref.WeakSet()
"""The strategies whose state was made rank 0's (:meth:`Sync.share_state_once`)."""


class Sync(Local):
    """The collectives of one backward over a process group of ``size > 1`` ranks (``group=None``: the default)."""

    active = True

    def __init__(self, group: Any, size: int, sharded: bool = False) -> None:
        self.group = group
        self.size = size
        self.sharded = sharded
        self.rank = dist.get_rank(group)
        self.device = torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend(group) == "nccl" else torch.device("cpu")
        self.counts: list[int] | None = None
        self.idle: list[Tensor] = []
        self.absent: list[Tensor] = []
        self.everywhere = True
        """After :meth:`share`: whether every task present on a rank is present on every rank."""

    def _reduce(self, tensor: Tensor, op: Any = None) -> Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op, group=self.group)
        return tensor

    # ------------------------------------------------------------------ the losses
    @contextlib.contextmanager
    def refusals(self, count: int) -> Iterator[None]:
        """Input checks: a rank whose check raises joins the collective of :meth:`share` (``count`` numbers) with
        its flag up before raising, so that the other ranks raise too instead of waiting for it."""
        try:
            yield
        except MTLZooError:
            flags = torch.zeros(count, dtype=torch.float64, device=self.device)
            flags[-1] = 1
            self._reduce(flags)
            raise

    def _refused(self, flag: float) -> None:
        if flag > 0:
            raise DistributedError("Another rank refused its input to this step (its own error says why); every rank "
                                   "stops here instead of waiting for it.")

    def share(self, losses: StepLosses, extra: Sequence[StepLosses], backbone_loss: Tensor | None,
              heads: Callable[[int], list[Tensor]]) -> tuple[StepLosses, list[StepLosses]]:
        """The whole batch's losses, and each rank's over the tasks present on any rank, in one all-reduce.

        ``heads(k)``: task k's head parameters; those of a task absent here get zero gradients here
        (:meth:`idle_roots`), and keep ``.grad = None`` where the task is absent from every rank.
        """
        num_tasks = len(losses.labels)
        batches = [losses, *extra]
        buffer = torch.zeros(self.share_size(num_tasks, len(batches)), dtype=torch.float64, device=self.device)
        for index, batch in enumerate(batches):
            offset = 2 * num_tasks * index
            tasks = batch.tasks.to(self.device)
            buffer[offset:offset + num_tasks].index_copy_(0, tasks, batch.values.detach().to(buffer))
            buffer[offset + num_tasks:offset + 2 * num_tasks].index_fill_(0, tasks, 1)
        if backbone_loss is not None:
            buffer[-3:-1] = torch.stack([backbone_loss.detach().reshape(()).to(buffer), buffer.new_ones(())])
        found = self._reduce(buffer).tolist()
        self._refused(found[-1])
        shared = []
        for index, batch in enumerate(batches):
            offset = 2 * num_tasks * index
            present = [k for k in range(num_tasks) if found[offset + num_tasks + k] > 0]
            reduced = torch.tensor([found[offset + k] for k in present], dtype=torch.float64) / self.size
            shared.append(_spread(batch, present, reduced.to(device=batch.values.device, dtype=batch.values.dtype)))
        if found[-2] > 0:
            like = backbone_loss if backbone_loss is not None else losses.values
            shared[0].backbone = torch.tensor(found[-3] / self.size, dtype=like.dtype, device=like.device)
        self.everywhere = all(found[num_tasks + task] == self.size for task in shared[0].present)
        if self.sharded and not self.everywhere:
            raise DistributedError(
                "A task has a loss on some ranks and None on others, which FSDP cannot take: the heads of the tasks "
                "absent from a rank would skip FSDP's reduce-scatter there while the other ranks wait in it. Give "
                "every present task a loss on every rank (a masked loss that is 0 where a share has no labels), or "
                f"wrap the wrapper in DistributedDataParallel (see {DOCS}).")
        mine, anywhere = set(losses.present), set(shared[0].present)
        for task in range(num_tasks):
            if task not in mine:
                params = [p for p in heads(task) if p.requires_grad]
                self.idle += params
                if task not in anywhere:
                    self.absent += [p for p in params if p.grad is None]
        return shared[0], shared[1:]

    def post_step(self, values: Tensor) -> Tensor:
        """The whole batch's K losses after the optimizer step, from this rank's (NaN: absent here, or everywhere)."""
        num_tasks = values.shape[0]
        present = ~torch.isnan(values)
        buffer = torch.cat([torch.where(present, values, 0).to(self.device, torch.float64),
                            present.to(self.device, torch.float64), torch.zeros(1, device=self.device,
                                                                                 dtype=torch.float64)])
        found = self._reduce(buffer)
        self._refused(float(found[-1]))
        mean = torch.where(found[num_tasks:-1] > 0, found[:num_tasks] / self.size, math.nan)
        return mean.to(device=values.device, dtype=values.dtype)

    # ------------------------------------------------------------------ the statistics
    def _gather(self, tensor: Tensor, dim: int) -> Tensor:
        """The ranks' tensors side by side along ``dim`` (they may differ in size there, not elsewhere)."""
        if self.counts is None:
            local = torch.tensor([tensor.shape[dim]], device=tensor.device)
            counts = [torch.zeros_like(local) for _ in range(self.size)]
            dist.all_gather(counts, local, group=self.group)
            self.counts = [int(count) for count in counts]
        most = max(self.counts)
        if tensor.shape[dim] < most:
            padding = list(tensor.shape)
            padding[dim] = most - tensor.shape[dim]
            tensor = torch.cat([tensor, tensor.new_zeros(padding)], dim)
        pieces = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(pieces, tensor.contiguous(), group=self.group)
        return torch.cat([piece.narrow(dim, 0, count) for piece, count in zip(pieces, self.counts)], dim)

    def gradients(self, rep: Tensor) -> Tensor:
        return self._gather(rep, 1) / self.size

    def representation(self, z: Tensor) -> Tensor:
        return self._gather(z, 0)

    def gramian(self, gramian: Tensor) -> Tensor:
        return self._reduce(gramian.clone()) / self.size ** 2

    def norms(self, norms: Tensor) -> Tensor:
        squares = self._reduce(norms.to(torch.float64).square())
        return (squares.sqrt() / self.size).to(norms.dtype)

    def average(self, tensors: Sequence[Tensor]) -> None:
        if len(tensors) == 1 and tensors[0].is_contiguous():
            self._reduce(tensors[0]).div_(self.size)
            return
        flat = self._reduce(torch.cat([t.reshape(-1) for t in tensors])).div_(self.size)
        for tensor, piece in zip(tensors, flat.split([t.numel() for t in tensors])):
            tensor.copy_(piece.view_as(tensor))

    def layer_norms(self, zs: Sequence[Tensor], grads: Sequence[Tensor], params: Sequence[Tensor],
                    dtype: torch.dtype) -> Tensor:
        """The norms of the whole batch's task gradients on ``params`` (a layer): from the ranks' mean Jacobian."""
        jacobian = parameter_jacobian(list(zs), list(grads), list(params)).to(dtype)
        self.average([jacobian])
        return row_norms(jacobian)

    def any(self, flag: bool) -> bool:
        return bool(self._reduce(torch.tensor([float(flag)], device=self.device), dist.ReduceOp.MAX)[0] > 0)

    # ------------------------------------------------------------------ the update
    def localize(self, update: Update, request: Request) -> Update:
        if update.direction is None or request.where != "representation" or self.counts is None:
            return update
        offset = sum(self.counts[:self.rank])
        mine = update.direction.narrow(0, offset, self.counts[self.rank]) * self.size
        return dataclasses.replace(update, direction=mine)

    def idle_roots(self) -> tuple[list[Tensor], list[Tensor]]:
        return list(self.idle), [torch.zeros_like(p) for p in self.idle]

    def restore(self) -> None:
        for param in self.absent:
            param.grad = None

    def shard_gramian(self, blocks: Sequence[Tensor]) -> Tensor:
        """``G = J J^T = sum_s J_s J_s^T`` over the column shards ``s`` of the whole batch's Jacobian ``J``: each rank
        gets its shard of ``J = (1/W) sum_r J^r`` by a reduce-scatter of its own K x n Jacobian (K x n/W received),
        and the shards' K x K Gramians are summed: half the bytes of the all-reduce of :meth:`average`."""
        matrix = torch.cat([block.reshape(block.shape[0], -1) for block in blocks], 1)
        tasks, width = matrix.shape
        columns = -(-width // self.size)
        padded = torch.nn.functional.pad(matrix, (0, columns * self.size - width))
        shard = self._reduce_scatter(padded.view(tasks, self.size, columns).transpose(0, 1).reshape(-1))
        shard = shard.view(tasks, columns) / self.size
        return self._reduce(shard @ shard.T)

    def _reduce_scatter(self, tensor: Tensor) -> Tensor:
        """Piece ``rank`` of the W equal pieces of the ranks' sum of ``tensor`` (flat)."""
        out = tensor.new_empty(tensor.numel() // self.size)
        dist.reduce_scatter_single(out, tensor, group=self.group)
        return out

    def check_gathered(self, params: Sequence[Tensor]) -> None:
        if self.sharded and any(isinstance(param, DTensor) for param in params):
            raise DistributedError(
                "FSDP resharded the backbone after its forward, so its parameters are shards when the strategy reads "
                "the per-task gradients on them (a K x n Jacobian over the whole parameters): shard the backbone with "
                "fully_shard(mtl.backbone, reshard_after_forward=False) and no FSDP module above it, or use "
                f"target='representation' (see {DOCS}).")

    def through_heads(self, loss: Tensor, excluded: Sequence[Tensor]) -> None:
        """The heads' gradients under FSDP: a backward of the heads' (weighted) losses into the parameters it reaches
        (the heads', unsharded), not into ``excluded`` (the strategy's, which learn from global numbers only) nor into
        ``z``. FSDP reduce-scatters the heads' gradients only in a backward through them: the head pass's
        ``autograd.grad`` accumulates nothing, and its gradients on the unsharded parameters are lost at the reshard."""
        skip = {id(param) for param in excluded}
        params = [leaf for leaf in leaves_reached([loss]) if isinstance(leaf, nn.Parameter)
                  and id(leaf) not in skip]
        if params:
            torch.autograd.backward(loss, inputs=params, retain_graph=True)

    # ------------------------------------------------------------------ once per run
    def broadcast_state(self, strategy: nn.Module) -> None:
        """Make the strategy's whole state (parameters, buffers, random streams, counters) rank 0's."""
        payload = [_on_cpu(strategy.state_dict()) if self.rank == 0 else None]
        source = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        dist.broadcast_object_list(payload, src=source, group=self.group)
        if self.rank != 0:
            strategy.load_state_dict(payload[0])

    def share_state_once(self, strategy: nn.Module) -> None:
        """:meth:`broadcast_state` at a strategy's first distributed step (the functional face's)."""
        if strategy not in _SHARED:
            self.broadcast_state(strategy)
            _SHARED.add(strategy)

    def check_agreement(self, module: nn.Module) -> None:
        """Raise :class:`DistributedError` unless every parameter of ``module`` is the same on every rank."""
        if any(is_sharded(part) for part in module.modules()):
            return  # FSDP's shards differ between ranks by design
        named = [(name, p.detach()) for name, p in module.named_parameters()]
        if not named:
            return
        prints = torch.stack([torch.stack([p.double().sum(), p.double().square().sum()]) for _, p in named]).flatten()
        found = self._reduce(torch.cat([prints, -prints]).to(self.device), dist.ReduceOp.MAX)
        high, low = found[:prints.numel()].view(-1, 2), -found[prints.numel():].view(-1, 2)
        same = (high == low) | (torch.isnan(high) & torch.isnan(low))
        differ = [name for (name, _), agree in zip(named, same.all(1).tolist()) if not agree]
        if differ:
            raise DistributedError(
                f"After the first optimizer step the ranks' parameters differ ({', '.join(differ[:5])}"
                f"{', ...' if len(differ) > 5 else ''}): the model's gradients were not averaged across the ranks. "
                "Wrap the wrapper in DistributedDataParallel and call that for the forward: ddp = "
                "DistributedDataParallel(mtl); predictions = ddp(x); mtl.backward(losses); mtl.step(optimizer) "
                f"(see {DOCS}).")


def _spread(losses: StepLosses, present: list[int], reduced: Tensor) -> SharedLosses:
    """``losses`` over the tasks ``present`` (a constant 0 for a task absent here), with the whole batch's values."""
    if present == losses.present:
        return SharedLosses(losses.values, losses.tasks, losses.requires_grad, losses.labels, losses.present,
                            losses.scalars, reduced=reduced)
    mine = dict(zip(losses.present, zip(losses.scalars, losses.requires_grad)))
    zero = (losses.values.new_zeros(()), False)
    scalars = [mine.get(task, zero)[0] for task in present]
    return SharedLosses(torch.stack(scalars), task_indices(tuple(present), losses.values.device),
                        [mine.get(task, zero)[1] for task in present], losses.labels, present, scalars,
                        reduced=reduced)


def _on_cpu(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return type(value)((key, _on_cpu(item)) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(item) for item in value)
    return value


# ---------------------------------------------------------------------- a wrapper's setting
class DataParallel:
    """A wrapper's data-parallel setting, and what it checked once.

    Args:
        setting: ``None``: on when ``torch.distributed`` is initialized with more than one process
            (the default group); ``False``: off; ``True``: on, the default group; or a process group.
    """

    def __init__(self, setting: Any = None) -> None:
        if setting is not None and not isinstance(setting, bool) and not (dist is not None and dist.is_available()
                                                                           and isinstance(setting, dist.ProcessGroup)):
            raise ValueError("Parameter `distributed` should be None, True, False or a torch.distributed process "
                             f"group. Found `distributed = {setting!r}`.")
        self.setting = setting
        self.started = False
        self.checked = False
        self.sharded = False

    def sync(self) -> Local:
        """The collectives of a step: a :class:`Sync` over the group, or :data:`LOCAL`."""
        if self.setting is False:
            return LOCAL
        if dist is None or not dist.is_available() or not dist.is_initialized():
            if self.setting is None:
                return LOCAL
            raise DistributedError("distributed= was given, but torch.distributed is not initialized: call "
                                   "torch.distributed.init_process_group() first (torchrun sets its environment).")
        group = None if isinstance(self.setting, bool) or self.setting is None else self.setting
        size = dist.get_world_size(group)
        return LOCAL if size == 1 else Sync(group, size, self.sharded)

    def forward_started(self, wrapper: nn.Module) -> None:
        """At the first training forward: the strategy's state becomes rank 0's; batch norm is warned about."""
        if self.started:
            return
        sync = self.sync()
        if not isinstance(sync, Sync):
            return
        strategy = wrapper.strategy
        sharded = [name or "the wrapper" for name, module in wrapper.named_modules() if is_sharded(module)]
        self.sharded = bool(sharded)
        if sharded:
            _check_sharding(wrapper, strategy, sharded)
        try:
            strategy.check_ready()  # type: ignore[operator]
        except NotMaterializedError as error:
            raise DistributedError(
                f"{type(strategy).__name__} creates its parameters at the first forward, which under torch.distributed "
                "must be rank 0's on every rank before a step: pass its shape (rotation_shape=...), or run one forward "
                "under torch.no_grad() before wrapping the wrapper in DistributedDataParallel.") from error
        sync.broadcast_state(strategy)
        self.started = True
        norms = [name for name, module in wrapper.named_modules() if is_batch_norm(module)]
        if norms:
            warnings.warn(f"Batch norm layers ({', '.join(norms[:5])}) normalise with each rank's own batch in "
                          "training mode, so a step cannot equal one process on the whole batch: convert them with "
                          f"torch.nn.SyncBatchNorm.convert_sync_batchnorm (on GPUs), or accept the difference (see "
                          f"{DOCS}). Said once.", RuntimeWarning, stacklevel=4)

    def step_taken(self, module: nn.Module) -> None:
        """After the first optimizer step: check that the ranks' parameters agree (where the forwards ran under
        torch.distributed)."""
        if self.checked or not self.started:
            return
        sync = self.sync()
        if isinstance(sync, Sync):
            self.checked = True
            sync.check_agreement(module)

    def __getstate__(self) -> dict[str, Any]:  # a process group does not pickle: a copy uses the default group
        setting = self.setting if self.setting is None or isinstance(self.setting, bool) else True
        return {"setting": setting, "started": False, "checked": False, "sharded": False}

    def __deepcopy__(self, memo: dict) -> DataParallel:
        return DataParallel(self.setting)


def _check_sharding(wrapper: nn.Module, strategy: nn.Module, sharded: list[str]) -> None:
    """Refuse what mtlzoo cannot train under FSDP (``sharded``: the names of the sharded modules)."""
    name = type(strategy).__name__
    shards = f"FSDP shards {', '.join(sharded[:3])}"
    if any(is_sharded(module) for module in (wrapper, strategy)):
        raise DistributedError(f"{shards}: shard the backbone and each head (fully_shard(mtl.backbone); "
                               "fully_shard(head) for each head), not the wrapper nor the strategy, whose state the "
                               f"engine keeps whole and the same on every rank (see {DOCS}).")
    covered = {id(param) for module in wrapper.modules() if is_sharded(module) for param in module.parameters()}
    plain = [name for name, param in wrapper.named_parameters()
             if param.requires_grad and id(param) not in covered and not name.startswith("strategy.")]
    if plain:
        raise DistributedError(
            f"{shards}, but not {', '.join(plain[:3])}{', ...' if len(plain) > 3 else ''}: no one averages those "
            "parameters' gradients over the ranks, so the ranks' models would drift apart. Shard the backbone and "
            f"every head (see {DOCS}).")
    legacy = [module for module in wrapper.modules() if isinstance(module, _legacy_fsdp())]
    if legacy and strategy.request.needs_gradients:
        raise DistributedError(
            f"{shards} with FullyShardedDataParallel: {name} reads per-task gradients, so the heads are back-"
            "propagated twice (their gradients on z, then into their parameters), and FullyShardedDataParallel "
            "frees the heads' gathered parameters after the first backward and does not gather them again. Shard "
            f"with torch.distributed.fsdp.fully_shard instead, or wrap the wrapper in DistributedDataParallel (see "
            f"{DOCS}).")


def _legacy_fsdp() -> type:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel


def strategy_names(root: nn.Module) -> list[str]:
    """The names (as ``root.named_parameters()`` and ``named_buffers()`` give them) of the parameters and buffers
    of every ``MTLWrapper``'s strategy inside ``root``: what ``DistributedDataParallel(root)`` should leave to the
    engine (it sets them the same on every rank). A module that holds a wrapper and is wrapped in DDP itself (as
    Lightning's ``ddp`` strategy does) may return them as its ``_ddp_params_and_buffers_to_ignore``."""
    names = []
    for prefix, module in root.named_modules():
        if isinstance(getattr(module, "_parallel", None), DataParallel):  # an MTLWrapper
            start = f"{prefix}.strategy." if prefix else "strategy."
            names += [start + name for name, _ in module.strategy.named_parameters()]
            names += [start + name for name, _ in module.strategy.named_buffers()]
    return names
