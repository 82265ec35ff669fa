"""The engine: the only module that asks autograd for per-task gradients, and the one place
where gradients reach the model.

A training forward of a strategy that reads gradients feeds every head its own detached copy
("leaf") of the backbone output ``z`` and keeps a :class:`ForwardRecord`. A backward then runs in
three moves:

1. :func:`head_pass`: one ``autograd.grad`` of ``sum_k w_k L_k`` through the heads gives every
   head parameter its gradient and every leaf ``k`` the task's ``g_k = d(w_k L_k)/dz``, for all K
   tasks at once, without touching ``.grad`` yet (a refused step leaves no trace);
2. :func:`statistics`: the statistic the strategy's request names, formed here and only here
   (the K x ... gradients on ``z``; the K x n Jacobian on the shared parameters by one vmapped
   vector-Jacobian product, a loop where vmap cannot batch the backbone; Gramians, norms);
3. :func:`apply`: one ``torch.autograd.backward`` over every root of the step (``z`` with the
   combined ``dz``, the heads' parameters with their gradients, the strategy's objective, the
   backbone's own loss), so gradients reach ``.grad`` through autograd's accumulation: hooks,
   ``DistributedDataParallel`` and a ``GradScaler`` see them as after a plain backward.

A cross-task loss (one that reads two heads' predictions) makes leaf ``k`` carry the gradient of
every loss that reads head ``k``, not of ``L_k`` alone. Parameters outside the model that a loss
reads (a learnable loss) get no gradient on the gradient paths: put them in a head.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from mtlzoo.errors import BackwardOrderError, ShapeMismatchError
from mtlzoo.linalg import compute_dtype, gramian, row_norms
from mtlzoo.protocol import Request, StepInputs, Update


@dataclass
class ForwardRecord:
    """What one training forward leaves for a backward: ``z``, the heads' leaves, the backbone's extras.

    The leaves are held weakly: once the predictions (and so the heads' graph) are gone, the
    record is dead and the backbone's graph is freed with it.
    """

    z: Tensor
    leaves: list[weakref.ref[Tensor]]
    extra_roots: list[Tensor] = field(default_factory=list)
    extra_leaves: list[weakref.ref[Tensor]] = field(default_factory=list)

    @classmethod
    def create(cls, z: Tensor, leaves: Sequence[Tensor], extra_roots: Sequence[Tensor] = (),
               extra_leaves: Sequence[Tensor] = ()) -> ForwardRecord:
        return cls(z, [weakref.ref(leaf) for leaf in leaves], list(extra_roots),
                   [weakref.ref(leaf) for leaf in extra_leaves])

    @property
    def alive(self) -> bool:
        return any(ref() is not None for ref in self.leaves)


class PendingForwards:
    """The training forwards not yet consumed by a backward: handles, not a single slot.

    Copies (``copy.deepcopy`` of the wrapper) and pickles start empty: a forward belongs to the
    graph it built, which a copy does not share.
    """

    def __init__(self) -> None:
        self.records: list[ForwardRecord] = []

    def add(self, record: ForwardRecord) -> None:
        self.records = [r for r in self.records if r.alive]
        self.records.append(record)

    def remove(self, records: Sequence[ForwardRecord]) -> None:
        ids = {id(r) for r in records}
        self.records = [r for r in self.records if id(r) not in ids and r.alive]

    def __len__(self) -> int:
        return len(self.records)

    def __deepcopy__(self, memo: dict) -> PendingForwards:
        return PendingForwards()

    def __getstate__(self) -> dict:
        return {"records": []}


@dataclass
class HeadPass:
    """The result of :func:`head_pass`: per-task gradients on ``z`` and the heads' parameter gradients."""

    records: list[ForwardRecord]
    grads: list[Tensor]
    head_params: list[Tensor]
    head_grads: list[Tensor]
    extra_roots: list[Tensor]
    extra_grads: list[Tensor]


def head_pass(records: Sequence[ForwardRecord], losses: Tensor, tasks: Tensor, requires: Sequence[bool],
              head_params: Sequence[Tensor], *, labels: Sequence[str], retain_graph: bool = False) -> HeadPass:
    """Back-propagate the (weighted, possibly scaled) present losses through the heads, accumulating nothing.

    Args:
        records: The pending forwards; those that the losses reach are consumed.
        losses: The present tasks' losses, ``(K',)``, as the model should learn from them.
        tasks: Their task indices.
        requires: Per present task, whether its loss depends on anything (a constant gets a zero gradient).
        head_params: The heads' parameters.
        labels: Task labels for messages.
        retain_graph: Keep the heads' graph.

    Raises:
        BackwardOrderError: A loss that depends on something but on no pending forward of this step.
    """
    if not any(record.alive for record in records):
        raise BackwardOrderError("No training forward is waiting for a backward: call mtl(x) in training mode with "
                                 "gradients enabled, compute the losses from its predictions, then backward() once.")
    index = tasks.tolist()
    live = [(record, [record.leaves[k]() for k in index], [ref() for ref in record.extra_leaves])
            for record in records if record.alive]
    inputs: list[Tensor] = []
    for _, leaves, extras in live:
        inputs += [leaf for leaf in leaves if leaf is not None] + [leaf for leaf in extras if leaf is not None]
    params = [p for p in head_params if p.requires_grad]
    results = torch.autograd.grad(losses.sum(), [*inputs, *params], allow_unused=True, retain_graph=retain_graph) \
        if inputs or params else ()
    found = iter(results[:len(inputs)])
    reached_task = [False] * len(index)
    used, grads, extra_roots, extra_grads = [], [], [], []
    for record, leaves, extras in live:
        rows = []
        for row, leaf in enumerate(leaves):
            grad = None if leaf is None else next(found)
            reached_task[row] |= grad is not None
            rows.append(grad)
        extra = [None if leaf is None else next(found) for leaf in extras]
        if all(grad is None for grad in rows) and all(grad is None for grad in extra):
            continue
        used.append(record)
        grads.append(torch.stack([torch.zeros_like(record.z) if g is None else g for g in rows]))
        for root, grad in zip(record.extra_roots, extra):
            if grad is not None:
                extra_roots.append(root)
                extra_grads.append(grad)
    stale = [labels[k] for k, needed, reached in zip(index, requires, reached_task) if needed and not reached]
    if stale:
        raise BackwardOrderError(
            f"The losses of tasks {stale} do not depend on any training forward of this step that backward() has not "
            "consumed yet: compute each loss from the predictions of mtl(x) (in training mode, with gradients "
            "enabled) and call backward() once per forward. Nothing was back-propagated.")
    head_grads = list(results[len(inputs):])
    kept = [(p, g) for p, g in zip(params, head_grads) if g is not None]
    return HeadPass(used, grads, [p for p, _ in kept], [g for _, g in kept], extra_roots, extra_grads)


def representation_gradients(grads: Sequence[Tensor]) -> Tensor:
    """The K' x ... gradients on ``z`` of all consumed forwards, concatenated along the batch dimension."""
    if len(grads) == 1:
        return grads[0]
    shapes = {tuple(g.shape[2:]) for g in grads}
    if len(shapes) != 1:
        raise ShapeMismatchError(f"One backward consumed forwards whose representations differ beyond the batch "
                                 f"dimension ({sorted(shapes)}); call backward() once per forward.")
    return torch.cat(list(grads), dim=1)


JACOBIAN_CHUNK_SIZE: int | None = None
"""Tasks per vmapped backward of :func:`parameter_jacobian` when the call does not say: ``None``
batches all K tasks in one backward, ``1`` is the loop (one backward per task), anything between
bounds the memory of the batched backward to ``chunk_size`` copies of the backbone's gradients."""

_VMAP_FAILED: WeakIdKeyDictionary = WeakIdKeyDictionary()
"""Backbones (keyed by their first shared parameter) on which vmap failed once: they take the loop."""


def parameter_jacobian(zs: Sequence[Tensor] | Tensor, grads: Sequence[Tensor] | Tensor, params: Sequence[Tensor], *,
                       batched: bool = True, retain_graph: bool = True, chunk_size: int | None = None) -> Tensor:
    """The K x n Jacobian of the losses w.r.t. ``params``, from ``G = dL/dz`` by the chain rule.

    Row k is ``sum_r (dz_r/dθ)^T G_r[k]`` over the forwards ``r``, flattened and concatenated over
    ``params`` in order; a parameter that no task reaches gives zero columns, and a parameter that
    task k does not reach zeros in row k. The blocks of :func:`jacobian_blocks`, side by side.

    Args:
        zs: The backbone output(s) the heads' leaves were detached from.
        grads: ``G`` per output, each of shape ``(K, *z.shape)``.
        params: The shared parameters θ.
        batched: ``False`` is ``chunk_size=1``: one backward per task.
        retain_graph: Keep the backbone's graph (the step's final backward still needs it).
        chunk_size: Tasks per vmapped backward: ``None`` takes :data:`JACOBIAN_CHUNK_SIZE` (all
            K at once unless set), ``1`` is the loop.
    """
    blocks, matrix = jacobian_blocks(zs, grads, params, batched=batched, chunk_size=chunk_size)
    if matrix is not None:
        return matrix
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)


def jacobian_blocks(zs: Sequence[Tensor] | Tensor, grads: Sequence[Tensor] | Tensor, params: Sequence[Tensor], *,
                    batched: bool = True, chunk_size: int | None = None) -> tuple[list[Tensor], Tensor | None]:
    """The Jacobian of the losses w.r.t. ``params`` as one K x numel block per parameter, and the K x n
    matrix the blocks are views of when it was filled in chunks (``None`` when the blocks are autograd's own).

    The K vector-Jacobian products run as one vmapped backward (``is_grads_batched``), or as
    ``ceil(K / chunk_size)`` of them. Where vmap cannot batch an operation of the backbone (a
    custom ``autograd.Function`` without a vmap rule, an ``.item()`` in a backward, memory), the
    per-task loop runs instead and is remembered for those parameters, with one warning. The
    backbone's graph is kept (the step's final backward still needs it). Arguments as
    :func:`parameter_jacobian`.

    In chunks, each chunk's rows are written into one K x n matrix as they come (the blocks are
    views of it), so the memory beyond the Jacobian is one chunk's rows, not a second Jacobian.
    """
    zs = [zs] if isinstance(zs, Tensor) else list(zs)
    grads = [grads] if isinstance(grads, Tensor) else list(grads)
    params = list(params)
    num_tasks = grads[0].shape[0]
    chunk = JACOBIAN_CHUNK_SIZE if chunk_size is None else chunk_size
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"Parameter `chunk_size` should be a positive int or None. Found `chunk_size = {chunk!r}`.")
    chunk = num_tasks if chunk is None else min(chunk, num_tasks)
    key = params[0] if params else None
    if not batched or (key is not None and key in _VMAP_FAILED):
        chunk = 1
    sizes = [p.numel() for p in params]
    matrix: Tensor | None = None

    def store(first: int, rows: Sequence[Tensor | None]) -> None:
        nonlocal matrix
        if matrix is None:
            dtype = next((row.dtype for row in rows if row is not None), params[0].dtype if params else torch.float32)
            matrix = grads[0].new_zeros(num_tasks, sum(sizes), dtype=dtype)
        offset = 0
        for row, size in zip(rows, sizes):
            if row is not None:
                matrix[first:first + row.shape[0], offset:offset + size] = row.reshape(row.shape[0], -1)
            offset += size

    for first in range(0, num_tasks, max(chunk, 1)):
        count = min(chunk, num_tasks - first)
        if count > 1:
            try:
                rows = torch.autograd.grad(zs, params, grad_outputs=[g[first:first + count] for g in grads],
                                           retain_graph=True, is_grads_batched=True, allow_unused=True)
            except (RuntimeError, NotImplementedError) as error:
                _remember_vmap_failure(key, error)
                chunk = 1
            else:
                if count == num_tasks:
                    return _blocks(rows, params, count), None
                store(first, rows)
                continue
        for task in range(first, num_tasks if chunk == 1 else first + count):
            row = torch.autograd.grad(zs, params, grad_outputs=[g[task] for g in grads], retain_graph=True,
                                      allow_unused=True)
            store(task, [None if g is None else g.unsqueeze(0) for g in row])
        if chunk == 1:
            break
    if matrix is None:  # no task
        matrix = grads[0].new_zeros(num_tasks, sum(sizes))
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    return [matrix[:, offset:offset + size] for offset, size in zip(offsets, sizes)], matrix


def _remember_vmap_failure(key: Tensor | None, error: BaseException) -> None:
    """Warn once per backbone that vmap could not batch its backward, and send it to the loop from now on."""
    if key is not None:
        _VMAP_FAILED[key] = str(error)
    warnings.warn(f"The batched (vmapped) Jacobian failed on this backbone ({type(error).__name__}: "
                  f"{str(error).splitlines()[0] if str(error) else ''}); the Jacobian is computed with one backward "
                  "per task from now on (same values, K backwards). Said once per backbone.",
                  RuntimeWarning, stacklevel=4)


def _blocks(rows: Sequence[Tensor | None], params: Sequence[Tensor], num_tasks: int) -> list[Tensor]:
    return [row.reshape(num_tasks, -1) if row is not None else p.new_zeros(num_tasks, p.numel())
            for row, p in zip(rows, params)]


@dataclass
class Statistics:
    """What :func:`statistics` formed that the update may reuse, unscaled.

    Attributes:
        rep: The representation gradients (K' x ...).
        blocks: The Jacobian on the shared parameters, one K' x numel block per parameter, if formed.
        last_layer: The linear last layer's per-task weight gradients, if its norms were read.
    """

    rep: Tensor
    blocks: list[Tensor] | None = None
    last_layer: LastLayerGradients | None = None


def statistics(request: Request, heads: HeadPass, shared: Sequence[Tensor], inputs: StepInputs,
               scale: Tensor | None, *, chunk_size: int | None = None,
               head_weights: Sequence[Tensor | None] = ()) -> Statistics:
    """Fill ``inputs`` with the statistic ``request`` names, unscaled and in at least float32.

    ``chunk_size`` is the number of tasks per vmapped backward of the Jacobian (see
    :func:`parameter_jacobian`). ``head_weights``: per present task, the weight of the linear layer
    through which alone the task reads its leaf of ``z`` (see :func:`layer_norms`), or ``None``.

    Norms on named parameters (GradNorm's layer) come from :func:`layer_norms`, without the
    Jacobian where the layer is the linear map that produces ``z``; an empty ``request.parameters``
    tuple names the last shared layer (:func:`last_layer_parameters`).

    Returns:
        What the update may reuse (:class:`Statistics`), unscaled.
    """
    rep = representation_gradients(heads.grads)
    dtype = compute_dtype(rep.dtype)
    rep = rep.to(dtype) if scale is None else rep.to(dtype) / scale.to(dtype)
    if request.where == "parameters" and request.statistic == "norms":
        zs = [record.z for record in heads.records]
        params = list(shared) if request.parameters != () else _last_layer_weights(zs[0])
        norms, last = layer_norms_and_gradients(zs, heads.grads, params, dtype=dtype, head_weights=head_weights)
        if scale is not None:
            norms = norms / scale.to(dtype)
            last = None if last is None else LastLayerGradients(last.layer, last.weight_grads / scale.to(dtype))
        inputs.norms = norms
        return Statistics(rep, last_layer=last)
    if request.where != "parameters":
        if request.statistic == "gradients":
            inputs.gradients = rep
        elif request.statistic == "gramian":
            inputs.gramian = gramian(rep)
        else:
            inputs.norms = row_norms(rep)
        return Statistics(rep)
    zs = [record.z for record in heads.records]
    blocks, matrix = jacobian_blocks(zs, heads.grads, shared, chunk_size=chunk_size)
    if matrix is not None and (matrix.dtype != dtype or scale is not None):
        matrix = matrix.to(dtype) if scale is None else matrix.to(dtype) / scale.to(dtype)
        offsets = [sum(b.shape[1] for b in blocks[:i]) for i in range(len(blocks))]
        blocks = [matrix[:, offset:offset + b.shape[1]] for offset, b in zip(offsets, blocks)]
    elif matrix is None:
        blocks = [b.to(dtype) if scale is None else b.to(dtype) / scale.to(dtype) for b in blocks]
    if request.statistic == "gramian":  # summed per parameter: the K x n matrix is never concatenated
        total = torch.zeros(rep.shape[0], rep.shape[0], dtype=dtype, device=rep.device)
        for block in blocks:
            total.addmm_(block, block.T)
        inputs.gramian = total
    else:  # norms on the parameters went to layer_norms above
        inputs.gradients = matrix if matrix is not None else blocks[0] if len(blocks) == 1 else torch.cat(blocks, 1)
    return Statistics(rep, blocks=blocks)


_VIEWS = frozenset({"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0"})
"""Autograd nodes of reshapes that ``nn.Linear`` puts around its product for inputs of more than 2 dimensions."""
_PASS_THROUGH = frozenset({"TBackward0", "ToCopyBackward0"})
"""Autograd nodes between a parameter and the product that reads it (``W^T``; autocast's cast of ``W``)."""


def _parameter_behind(node: object) -> Tensor | None:
    """The leaf tensor (a parameter) that ``node`` leads to through transposes and casts, or ``None``."""
    while node is not None:
        variable = getattr(node, "variable", None)
        if variable is not None:
            return variable
        if type(node).__name__ not in _PASS_THROUGH or len(node.next_functions) != 1:  # type: ignore[attr-defined]
            return None
        node = node.next_functions[0][0]  # type: ignore[attr-defined]
    return None


@dataclass
class LinearOutput:
    """The linear map that produces ``z`` (``z = h W^T + b``, reshaped): its input ``h`` (N x m) and parameters."""

    input: Tensor
    weight: Tensor | None
    bias: Tensor | None


@dataclass
class LastLayerGradients:
    """The per-task gradients of the linear last layer ``z = h W^T + b``, kept from its norms' product.

    ``weight_grads[:, k, :]`` is ``(dL_k/dW)^T`` (m x d), unscaled: with them the step's update
    reaches ``W`` as a sum over tasks instead of another ``h^T dz`` product, and the backward
    continues from ``h`` (:func:`last_layer_update`).
    """

    layer: LinearOutput
    weight_grads: Tensor


def linear_output(z: Tensor) -> LinearOutput | None:
    """Recognise ``z = h W^T + b`` (``nn.Linear``, ``F.linear``, also under autocast) from the graph of ``z``.

    Reads ``h`` from the tensors autograd saved for the product, so no forward hook and no extra
    pass is needed. Returns ``None`` when the operation that produces ``z`` is anything else.
    """
    node = z.grad_fn
    while node is not None and type(node).__name__ in _VIEWS and len(node.next_functions) == 1:
        node = node.next_functions[0][0]
    name = type(node).__name__
    try:
        if name == "AddmmBackward0":
            if float(node._saved_alpha) != 1 or float(node._saved_beta) != 1:  # type: ignore[union-attr]
                return None
            bias_node, _, weight_node = (edge[0] for edge in node.next_functions)  # type: ignore[union-attr]
            weight = _parameter_behind(weight_node)
            layer_input = node._saved_mat1 if weight is not None else None  # type: ignore[union-attr]
            bias = _parameter_behind(bias_node)
        elif name == "MmBackward0":
            weight = _parameter_behind(node.next_functions[1][0])  # type: ignore[union-attr]
            layer_input = node._saved_self if weight is not None else None  # type: ignore[union-attr]
            bias = None
        else:
            return None
    except RuntimeError:  # saved tensors already freed
        return None
    if layer_input is None or layer_input.dim() != 2:
        return None
    width = z.shape[-1] if z.dim() else 0
    if layer_input.shape[0] * width != z.numel():
        return None
    if weight is not None and weight.numel() != layer_input.shape[1] * width:
        return None
    if bias is not None and bias.numel() != width:
        return None
    return LinearOutput(layer_input, weight, bias)


def _last_layer_weights(z: Tensor) -> list[Tensor]:
    """:func:`last_layer_parameters`, read from the linear map that produces ``z`` where there is one."""
    layer = linear_output(z)
    if layer is not None and layer.weight is not None and layer.weight.requires_grad:
        return [layer.weight]
    return last_layer_parameters(z)


def last_layer_parameters(z: Tensor) -> list[Tensor]:
    """The weights of the last shared layer: the trainable parameters read by the operation nearest ``z``.

    Walks the graph of ``z`` back from its last operation, breadth first, to the first one that reads
    trainable parameters directly (through a transpose or autocast's cast); of those, the ones of two
    or more dimensions (the layer's weights, as GradNorm reads ``W``), or all of them if none has.

    Raises:
        ShapeMismatchError: ``z`` depends on no trainable parameter.
    """
    frontier = [z.grad_fn] if z.grad_fn is not None else []
    seen: set[int] = set()
    while frontier:
        following = []
        for node in frontier:
            if id(node) in seen:
                continue
            seen.add(id(node))
            params = [p for p in (_parameter_behind(edge[0]) for edge in node.next_functions) if p is not None]
            if params:
                weights = [p for p in params if p.dim() >= 2]
                return weights or params
            following += [edge[0] for edge in node.next_functions if edge[0] is not None]
        frontier = following
    raise ShapeMismatchError("The backbone output depends on no trainable parameter, so there is no last shared "
                             "layer to read gradient norms on.")


def layer_norms(zs: Sequence[Tensor], grads: Sequence[Tensor], params: Sequence[Tensor], *,
                dtype: torch.dtype = torch.float32) -> Tensor:
    """The K norms ``||dL_k/dθ||`` on the parameters ``params`` of one layer, from ``G = dL/dz``.

    When ``z`` is produced by the linear map of those parameters (``z = h W^T + b``, see
    :func:`linear_output`), ``dL_k/dW = G_k^T h`` and ``dL_k/db = sum_n G_k[n]``: no backward at all,
    one (K d) x N x m product, or less where every head reads ``z`` through a narrow linear layer
    (see :func:`layer_norms_and_gradients`). Otherwise (a convolution, a layer below the last one) the rows of the
    Jacobian restricted to ``params`` (:func:`parameter_jacobian`: one vmapped backward through that
    layer and those above it only).

    A weight that the backbone also reads before its last layer (tied weights) gets, on the linear
    route, only the gradient of its last use.

    Args:
        zs: The backbone output(s) of the step's forwards.
        grads: ``G`` per output, each ``(K, *z.shape)`` (as scaled as the losses were).
        params: The layer's parameters.
        dtype: The dtype to compute the norms in.
    """
    return layer_norms_and_gradients(zs, grads, params, dtype=dtype)[0]


def layer_norms_and_gradients(zs: Sequence[Tensor], grads: Sequence[Tensor], params: Sequence[Tensor], *,
                              dtype: torch.dtype = torch.float32, head_weights: Sequence[Tensor | None] = ()
                              ) -> tuple[Tensor, LastLayerGradients | None]:
    """:func:`layer_norms`, and the last layer's per-task weight gradients where the linear route made them
    (one forward, the weight among ``params``, everything in ``dtype``), as scaled as ``grads``.

    ``head_weights``: per task, the weight ``V_k`` (o x d) of the linear layer through which alone task
    k reads its leaf of ``z`` (a head that starts with a plain ``nn.Linear``), or ``None``. Where every
    task has one of the same small width o, ``G_k = D_k V_k`` and the weight's norms come from
    ``||V_k^T (D_k^T h)||``: ``K B o (d + m)`` multiply-adds instead of ``K B d m``, and no per-task
    gradients are kept.
    """
    with torch.no_grad():
        return _layer_norms(zs, grads, params, dtype, head_weights)


def _layer_norms(zs: Sequence[Tensor], grads: Sequence[Tensor], params: Sequence[Tensor], dtype: torch.dtype,
                 head_weights: Sequence[Tensor | None] = ()) -> tuple[Tensor, LastLayerGradients | None]:
    wanted = {id(p) for p in params}
    layers = [linear_output(z) for z in zs]
    if wanted and all(layer is not None for layer in layers):
        roles = {id(layer.weight): "weight" for layer in layers if layer.weight is not None}  # type: ignore[union-attr]
        roles.update({id(layer.bias): "bias" for layer in layers if layer.bias is not None})  # type: ignore[union-attr]
        same_layer = len({id(layer.weight) for layer in layers}) == 1  # type: ignore[union-attr]
        if same_layer and wanted <= set(roles):
            num_tasks = grads[0].shape[0]
            flat = [g.reshape(num_tasks, -1, g.shape[-1]).to(dtype) for g in grads]
            pieces: list[Tensor] = []  # the norms of the weight's and the bias's gradients
            kept = None
            factored = _factored_weight_norms(layers[0].input, grads[0], head_weights, dtype) \
                if len(layers) == 1 and id(layers[0].weight) in wanted else None  # type: ignore[union-attr]
            if factored is not None:
                pieces.append(factored)
            elif id(layers[0].weight) in wanted:  # type: ignore[union-attr]
                # dL_k/dW^T = h^T G_k for the K tasks as one product: h^T [G_1 ... G_K], m x (K d)
                products = [torch.mm(layer.input.to(dtype).T,  # type: ignore[union-attr]
                                     g.transpose(0, 1).reshape(g.shape[1], -1)) for g, layer in zip(flat, layers)]
                product = products[0] if len(products) == 1 else torch.stack(products).sum(0)
                per_task = product.view(product.shape[0], num_tasks, -1)
                pieces.append(row_norms(per_task, dim=1))
                layer = layers[0]
                if len(layers) == 1 and layer.input.dtype == layer.weight.dtype == dtype:  # type: ignore[union-attr]
                    kept = LastLayerGradients(layer, per_task)  # type: ignore[arg-type]
            if layers[0].bias is not None and id(layers[0].bias) in wanted:  # type: ignore[union-attr]
                bias = flat[0].sum(1) if len(flat) == 1 else torch.stack([g.sum(1) for g in flat]).sum(0)
                pieces.append(row_norms(bias))
            return (pieces[0] if len(pieces) == 1 else torch.hypot(*pieces)), kept  # hypot: no overflow
    return row_norms(parameter_jacobian(list(zs), list(grads), list(params)).to(dtype)), None


FACTORED_WIDTH = 8
"""Widest head layer (outputs o) through which :func:`layer_norms` factors the per-task gradients."""


def _factored_weight_norms(layer_input: Tensor, grads: Tensor, head_weights: Sequence[Tensor | None],
                           dtype: torch.dtype) -> Tensor | None:
    """``||G_k^T h||_F`` with ``G_k = D_k V_k`` (``grads`` (K, N, d), ``V_k`` the task's head layer, o x d).

    ``D_k = G_k V_k^T (V_k V_k^T)^-1`` (exact when task k reads its leaf through ``V_k`` alone), then
    ``||V_k^T (D_k^T h)||_F^2 = <P_k, (V_k V_k^T) P_k>`` with ``P_k = D_k^T h`` (o x m). ``None`` (the
    product route instead) unless every task has such a layer, all of one width o <= FACTORED_WIDTH,
    with ``V_k V_k^T`` well conditioned.
    """
    if not head_weights or len(head_weights) != grads.shape[0] or any(w is None for w in head_weights):
        return None
    shapes = {(tuple(w.shape), w.dtype) for w in head_weights if w is not None}
    if len(shapes) != 1:
        return None
    (width, size), weight_dtype = next(iter(shapes))
    # Another dtype than the gradients' (autocast) means the layer ran on a rounded copy of V_k.
    if width > FACTORED_WIDTH or size != grads.shape[-1] or weight_dtype != grads.dtype:
        return None
    weights = torch.stack([w.detach() for w in head_weights if w is not None]).to(dtype)  # (K, o, d)
    gram = weights @ weights.mT  # (K, o, o)
    eigenvalues = torch.linalg.eigvalsh(gram)
    low, high = torch.stack([eigenvalues[:, 0].min(), eigenvalues[:, -1].max()]).tolist()
    if not (low > 1e-6 * high and math.isfinite(high)):
        return None
    flat = grads.reshape(grads.shape[0], -1, size).to(dtype)
    factors = torch.linalg.solve(gram, (flat @ weights.mT).mT)  # D_k^T, (K, o, N)
    products = factors @ layer_input.to(dtype)  # P_k = D_k^T h, (K, o, m)
    squares = (products * (gram @ products)).sum((1, 2))
    return squares.clamp_min(0).sqrt()


def last_layer_update(last: LastLayerGradients, dz: Tensor, weights: Tensor | None
                      ) -> tuple[list[Tensor], list[Tensor]]:
    """Roots and gradients that apply ``dz = sum_k c_k G_k`` from the last layer down, without its ``h^T dz``.

    ``W`` gets ``sum_k c_k (dL_k/dW)`` from the kept per-task gradients, ``b`` gets ``sum_n dz[n]``,
    and the backward goes on from the layer's input ``h`` with ``dz W``: what a backward of ``z``
    computes, less one product. ``weights`` is ``c`` (``None``: all ones); all unscaled.
    """
    layer = last.layer
    assert layer.weight is not None
    flat = dz.reshape(-1, dz.shape[-1]).to(layer.weight.dtype)
    summed = last.weight_grads.sum(1) if weights is None else \
        torch.einsum("mkd,k->md", last.weight_grads, weights.to(last.weight_grads.dtype))
    roots, grads = [layer.weight], [summed.T]
    if layer.bias is not None and layer.bias.requires_grad:
        roots.append(layer.bias)
        grads.append(flat.sum(0))
    if layer.input.requires_grad:
        roots.append(layer.input)
        grads.append(flat @ layer.weight.detach())
    return roots, grads


def shared_update(update: Update, rep: Tensor, request: Request, blocks: Sequence[Tensor] | None = None,
                  params: Sequence[Tensor] = ()) -> tuple[Tensor | None, list[Tensor] | None]:
    """The combined gradient, unscaled: ``(dz, None)`` through the representation, or ``(None, grads)``,
    one gradient per shared parameter in ``params``.

    A weighting ``c`` (or the plain sum) goes back through ``z`` as ``dz = sum_k c_k dL_k/dz``,
    unless the Jacobian's ``blocks`` (one per parameter of ``params``) are given: then each
    parameter gets ``J_p^T c`` directly, which saves the backward of ``dz`` through the backbone
    (give them only when they cover every leaf ``z`` depends on, see :func:`covers_representation`).
    A direction on the parameters (a flat n-vector) is split over ``params``.
    """
    if update.direction is not None:
        if request.where == "parameters":
            sizes = [p.numel() for p in params]
            if update.direction.shape != (sum(sizes),):
                raise ShapeMismatchError(f"The strategy's direction has shape {tuple(update.direction.shape)}; the "
                                         f"shared parameters have {sum(sizes)} entries.")
            return None, [piece.view_as(p) for piece, p in zip(update.direction.split(sizes), params)]
        if update.direction.shape != rep.shape[1:]:
            raise ShapeMismatchError(f"The strategy's direction has shape {tuple(update.direction.shape)}; the "
                                     f"representation gradients have shape {tuple(rep.shape[1:])}.")
        return update.direction, None
    if update.weights is not None and update.weights.shape != rep.shape[:1]:
        raise ShapeMismatchError(f"The strategy returned {tuple(update.weights.shape)} weights for "
                                 f"{rep.shape[0]} tasks.")
    if blocks is None:
        return (rep.sum(0) if update.weights is None else torch.tensordot(update.weights.to(rep.dtype), rep, dims=1)), \
            None
    if update.weights is None:
        return None, [block.sum(0).view_as(p) for block, p in zip(blocks, params)]
    weights = update.weights.to(blocks[0].dtype) if blocks else update.weights
    return None, [(weights @ block).view_as(p) for block, p in zip(blocks, params)]


def covers_representation(zs: Sequence[Tensor], params: Sequence[Tensor]) -> bool:
    """Whether the backbone outputs ``zs`` depend on no leaf tensor other than ``params``.

    Walks the graphs of ``zs`` (a few microseconds per operation). A weight tied to a head, an
    input that requires grad, or a parameter outside the backbone make it ``False``.
    """
    wanted = {id(p) for p in params}
    seen: set[int] = set()
    stack = [z.grad_fn for z in zs if z.grad_fn is not None]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if variable is not None:
            if id(variable) not in wanted:
                return False
            continue
        stack += [edge[0] for edge in node.next_functions if edge[0] is not None]  # type: ignore[attr-defined]
    return True


def split_batches(dz: Tensor, records: Sequence[ForwardRecord]) -> list[Tensor]:
    """Split a gradient on the concatenated representation back into one per forward."""
    if len(records) == 1:
        return [dz]
    return list(dz.split([record.z.shape[0] for record in records], dim=0))


def apply(roots: Sequence[Tensor], grads: Sequence[Tensor | None], *, retain_graph: bool = False) -> None:
    """One backward over every root of the step, so accumulation hooks fire once.

    What ``torch.autograd.backward`` runs, given to autograd's engine directly: the engine builds
    every gradient with its root's shape and dtype, so the per-root checks of the Python entry
    point (about 10 us per root, a dozen roots per step) are skipped; a root without a gradient
    (a scalar objective) gets ones.
    """
    if not roots:
        return
    filled = tuple(torch.ones_like(root) if grad is None else grad for root, grad in zip(roots, grads))
    if _ENGINE is None:
        torch.autograd.backward(list(roots), list(filled), retain_graph=retain_graph)
        return
    _ENGINE.run_backward(tuple(roots), filled, retain_graph, False, (), allow_unreachable=True, accumulate_grad=True)


_ENGINE = getattr(torch.autograd.Variable, "_execution_engine", None)
if not hasattr(_ENGINE, "run_backward"):
    _ENGINE = None
