"""Every read of torch's autograd-graph or module internals that mtlzoo makes, and a self-test of each.

The engine's cheap routes rest on a few facts about how torch builds its graphs, none of them public API: the node that
``nn.Linear`` leaves behind (``AddmmBackward0`` with ``_saved_mat1``, ``MmBackward0`` with ``_saved_self``, the
transpose and cast nodes around the weight), the ``variable`` of an ``AccumulateGrad`` node, a module's ``_parameters``
and ``_modules`` dicts and its hook dicts (``_forward_hooks``, ...) and their process-wide counterparts
(``torch.nn.modules.module._global_forward_hooks``, ...), and a tensor's in-place version counter (``_version``). They
are read here and only here, and :func:`check_internals` checks each against the installed torch: it raises
:class:`TorchInternalsError` naming the pattern and the torch version when one stops matching (the test suite runs it).
Where a pattern does not match at run time, the callers take their general route (same values, more work); nothing here
is needed for correctness except the graph walks, which :func:`check_internals` covers too.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch._functorch import config as functorch_config
from torch.nn.modules import module as module_globals

from mtlzoo.errors import MTLZooError


class TorchInternalsError(MTLZooError, RuntimeError):
    """A fact about torch's internals that the engine relies on no longer holds for the installed torch."""


class CompiledGraphError(MTLZooError, ValueError):
    """A statistic needs to see inside a region compiled by ``torch.compile``, which the graph does not show."""


_VIEWS = frozenset({"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0"})
"""Autograd nodes of reshapes that ``nn.Linear`` puts around its product for inputs of more than 2 dimensions."""
_PASS_THROUGH = frozenset({"TBackward0", "ToCopyBackward0"})
"""Autograd nodes between a parameter and the product that reads it (``W^T``; autocast's cast of ``W``)."""
_COMPILED_NODE = "CompiledFunctionBackward"
"""The class name of the autograd node of a region compiled by ``torch.compile`` (AOTAutograd)."""
_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
"""A module's own hook dicts; ``torch.nn.modules.module`` holds the process-wide ones as ``_global`` + name."""


# ---------------------------------------------------------------- graph walks
def inputs_of(node: object) -> list[object]:
    """The nodes that ``node`` passes gradients to (``next_functions``, without the empty slots)."""
    return [edge[0] for edge in node.next_functions if edge[0] is not None]  # type: ignore[attr-defined]


def leaf_of(node: object) -> Tensor | None:
    """The leaf tensor an ``AccumulateGrad`` node accumulates into, or ``None`` for any other node."""
    return getattr(node, "variable", None)


def walk(roots: Iterable[Tensor], stop: Sequence[Tensor] = ()) -> Iterator[object]:
    """Every node of the graphs of ``roots``, each once, depth first, not walking on past the nodes that
    produced the tensors ``stop``."""
    # the nodes are held: an id names a node only while its Python object lives, and next_functions makes new ones
    seen: dict[int, object] = {id(node): node for node in (t.grad_fn for t in stop) if node is not None}
    stack = [root.grad_fn for root in roots if root.grad_fn is not None]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen[id(node)] = node
        yield node
        stack += inputs_of(node)


def leaves_reached(roots: Sequence[Tensor], stop: Sequence[Tensor] = ()) -> Iterator[Tensor]:
    """The leaf tensors (parameters, inputs that require grad) that the graphs of ``roots`` reach, not
    walking on past the nodes that produced the tensors ``stop``."""
    for node in walk(roots, stop):
        leaf = leaf_of(node)
        if leaf is not None:
            yield leaf


def marked_leaves_reached(root: Tensor, marked: set[int], *, first: bool = False) -> set[int]:
    """The ids of the leaves in ``marked`` that the graph of ``root`` reaches, not walking on past a node
    that reads one (so the graph behind a marked input is not visited); with ``first``, only the first one
    found (the walk stops there)."""
    found: set[int] = set()
    seen: dict[int, object] = {}  # the nodes held, as in walk()
    stack = [root.grad_fn] if root.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen[id(node)] = node
        inner = []
        hit = False
        for child, _ in node.next_functions:
            if child is None:
                continue
            if type(child) is not _ACCUMULATE_GRAD:
                inner.append(child)
            elif id(child.variable) in marked:
                found.add(id(child.variable))
                if first:
                    return found
                hit = True
        if not hit:
            stack += reversed(inner)  # a layer's input usually comes before its weights: walked first
    return found


def _accumulate_grad_type() -> type:
    leaf = torch.zeros((), requires_grad=True)
    return type((leaf * 1).grad_fn.next_functions[0][0])  # type: ignore[union-attr]


_ACCUMULATE_GRAD = _accumulate_grad_type()
"""The class of the node that accumulates into a leaf (``AccumulateGrad``, whose ``variable`` is the leaf)."""


def parameter_behind(node: object) -> Tensor | None:
    """The leaf tensor (a parameter) that ``node`` leads to through transposes and casts, or ``None``."""
    while node is not None:
        leaf = leaf_of(node)
        if leaf is not None:
            return leaf
        if type(node).__name__ not in _PASS_THROUGH or len(node.next_functions) != 1:  # type: ignore[attr-defined]
            return None
        node = node.next_functions[0][0]  # type: ignore[attr-defined]
    return None


def nearest_parameters(z: Tensor) -> list[Tensor]:
    """The trainable leaves read by the operation nearest ``z`` that reads any directly (through a transpose
    or a cast), walking the graph back from ``z`` breadth first; empty when ``z`` depends on none.

    Raises:
        CompiledGraphError: That operation is a compiled region (``torch.compile``), which reads the
            parameters of every layer inside it: the nearest layer cannot be told apart.
    """
    frontier = [z.grad_fn] if z.grad_fn is not None else []
    seen: dict[int, object] = {}  # the nodes held, as in walk()
    while frontier:
        following: list[object] = []
        for node in frontier:
            if id(node) in seen:
                continue
            seen[id(node)] = node
            params = [p for p in (parameter_behind(child) for child in inputs_of(node)) if p is not None]
            if params and is_compiled_node(node):
                raise CompiledGraphError(
                    "The last shared layer cannot be found through a compiled backbone: torch.compile makes the "
                    "whole compiled region one node of the graph, which reads the parameters of all its layers. "
                    "Name the layer's parameters instead (GradNorm's layer=[...], as backbone.named_parameters() "
                    "names them), or compile the layers below the last one only.")
            if params:
                return params
            following += inputs_of(node)
        frontier = following
    return []


def is_compiled_node(node: object) -> bool:
    """Whether ``node`` is the backward of a region compiled by ``torch.compile`` (AOTAutograd's node)."""
    return type(node).__name__ == _COMPILED_NODE


def compiled_original(module: nn.Module) -> nn.Module | None:
    """The module that ``torch.compile(module)`` wrapped, or ``None`` when ``module`` is not such a wrapper."""
    original = getattr(module, "_orig_mod", None)
    return original if type(module).__name__ == "OptimizedModule" and isinstance(original, nn.Module) else None


def without_donated_buffers() -> contextlib.AbstractContextManager[object]:
    """Within the block, regions that ``torch.compile`` compiles keep their buffers for more than one backward
    (AOTAutograd's ``donated_buffer`` option off), as the Jacobian on the shared parameters needs; a no-op where
    torch has no such option."""
    if not hasattr(functorch_config, "donated_buffer"):
        return contextlib.nullcontext()
    return functorch_config.patch(donated_buffer=False)


def is_donated_buffer_error(error: BaseException) -> bool:
    """Whether ``error`` is AOTAutograd refusing a second backward of a compiled region whose buffers it donated."""
    return isinstance(error, RuntimeError) and "donated buffer" in str(error)


@dataclass
class LinearOutput:
    """The linear map that produces ``z`` (``z = h W^T + b``, reshaped): its input ``h`` (N x m) and parameters."""

    input: Tensor
    weight: Tensor | None
    bias: Tensor | None


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
            weight = parameter_behind(weight_node)
            layer_input = node._saved_mat1 if weight is not None else None  # type: ignore[union-attr]
            bias = parameter_behind(bias_node)
        elif name == "MmBackward0":
            weight = parameter_behind(node.next_functions[1][0])  # type: ignore[union-attr]
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


# ---------------------------------------------------------------- modules and tensors
def has_module_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has a forward or backward (pre-)hook of its own."""
    return any(getattr(module, name, None) for name in _MODULE_HOOKS)


def has_global_module_hooks() -> bool:
    """Whether a process-wide module hook is installed (by ``torch.nn.modules.module``'s global hook registrations)."""
    return any(getattr(module_globals, "_global" + name, None) for name in _MODULE_HOOKS)


def is_batch_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a batch norm layer (torch's ``_BatchNorm``, lazy ones too), not ``SyncBatchNorm``."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, nn.SyncBatchNorm)


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` is sharded by FSDP (``FullyShardedDataParallel``, or ``fully_shard``'s ``FSDPModule``)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed import fsdp

    return isinstance(module, (fsdp.FullyShardedDataParallel, fsdp.FSDPModule))


DDP_IGNORED = "_ddp_params_and_buffers_to_ignore"
"""The attribute of a module with the names of the parameters and buffers ``DistributedDataParallel`` leaves out
(read by its constructor; torch's setter is ``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model``)."""


def parameters_of(module: nn.Module) -> list[Tensor]:
    """``list(module.parameters())``, read from the modules' ``_parameters`` and ``_modules`` dicts directly (a
    third of the time of ``parameters()``'s generators, which the engine lists at every step): the same
    parameters in the same order, each once."""
    found: list[Tensor] = []
    seen: set[int] = set()
    stack = [module]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        for param in current._parameters.values():
            if param is not None and id(param) not in seen:
                seen.add(id(param))
                found.append(param)
        stack += [child for child in reversed(current._modules.values()) if child is not None]
    return found


def version_of(tensor: Tensor) -> int:
    """The tensor's in-place version counter: it moves whenever the tensor is written in place."""
    return tensor._version


def version_sum(tensors: Iterable[Tensor]) -> int:
    """The sum of the tensors' in-place version counters: it moves whenever one of them is written in place."""
    return sum(version_of(t) for t in tensors)


# ---------------------------------------------------------------- the self-test
def _fail(pattern: str, detail: str) -> TorchInternalsError:
    return TorchInternalsError(
        f"mtlzoo's engine reads {pattern} from torch's internals, which torch {torch.__version__} no longer "
        f"provides as expected: {detail}. Use a torch version that mtlzoo's CI runs (see pyproject.toml), or "
        "report it to mtlzoo with this message.")


def check_internals() -> None:
    """Check every pattern of this module against the installed torch.

    Raises:
        TorchInternalsError: A pattern stopped matching; the message names it and the torch version.
    """
    generator = torch.Generator().manual_seed(0)
    layer = nn.Linear(3, 2)
    h = torch.randn(4, 3, generator=generator)
    z = layer(h)
    if type(z.grad_fn).__name__ != "AddmmBackward0":
        raise _fail("the node of nn.Linear (AddmmBackward0)", f"nn.Linear's output has {type(z.grad_fn).__name__}")
    found = linear_output(z)
    if found is None or (found.input is not h and not torch.equal(found.input, h)):
        raise _fail("AddmmBackward0._saved_mat1 and the weight behind TBackward0",
                    "the linear layer's input or weight is not found from its output")
    if found.weight is not layer.weight or found.bias is not layer.bias:
        raise _fail("AccumulateGrad.variable behind AddmmBackward0", "the layer's parameters are not found")
    batched = layer(h.view(2, 2, 3))
    found = linear_output(batched)
    if found is None or found.weight is not layer.weight or found.input.shape != (4, 3):
        raise _fail(f"the reshape nodes {sorted(_VIEWS)} around nn.Linear's product",
                    f"a 3-d input gives {type(batched.grad_fn).__name__}")
    no_bias = nn.Linear(3, 2, bias=False)
    found = linear_output(no_bias(h))
    if found is None or found.weight is not no_bias.weight or found.bias is not None:
        raise _fail("MmBackward0._saved_self", "a linear layer without bias is not recognised")
    if {id(p) for p in nearest_parameters(torch.tanh(z))} != {id(layer.weight), id(layer.bias)}:
        raise _fail("next_functions and AccumulateGrad.variable", "the parameters nearest an output are not found")
    if {id(t) for t in leaves_reached([z.sum()])} != {id(layer.weight), id(layer.bias)}:
        raise _fail("next_functions and AccumulateGrad.variable", "the leaves of a graph are not found")
    head = nn.Linear(2, 1)
    if {id(t) for t in leaves_reached([head(z).sum()], stop=[z])} != {id(head.weight), id(head.bias)}:
        raise _fail("next_functions", "a walk does not stop at the node that produced a given tensor")
    marker = torch.zeros((), requires_grad=True)
    if marked_leaves_reached((torch.tanh(z) + marker).sum(), {id(marker)}) != {id(marker)}:
        raise _fail("next_functions and AccumulateGrad.variable", "a marked leaf of a graph is not found")
    if _ACCUMULATE_GRAD.__name__ != "AccumulateGrad" or leaf_of(layer.weight.view(-1).grad_fn.next_functions[0][0]) \
            is not layer.weight:
        raise _fail("AccumulateGrad", "the node that accumulates into a leaf is not recognised")
    module = nn.Linear(1, 1)
    for name in _MODULE_HOOKS:
        if not isinstance(getattr(module, name, None), dict):
            raise _fail(f"nn.Module.{name}", "the attribute is missing or not a dict")
        if not isinstance(getattr(module_globals, "_global" + name, None), dict):
            raise _fail(f"torch.nn.modules.module._global{name}", "the attribute is missing or not a dict")
    handle = module.register_forward_hook(lambda *_: None)
    hooked = has_module_hooks(module)
    handle.remove()
    if not hooked or has_module_hooks(module):
        raise _fail("nn.Module._forward_hooks", "a registered forward hook is not seen")
    if not is_batch_norm(nn.LazyBatchNorm1d()) or is_batch_norm(nn.SyncBatchNorm(1)):
        raise _fail("torch.nn.modules.batchnorm._BatchNorm", "batch norm layers are not recognised")
    if DDP_IGNORED not in inspect.getsource(nn.parallel.DistributedDataParallel.__init__):
        raise _fail(f"DistributedDataParallel's {DDP_IGNORED}", "its constructor no longer reads the attribute")
    shared = nn.Linear(2, 2)
    tree = nn.Sequential(nn.Linear(3, 2), nn.Sequential(shared, nn.ReLU(), shared),
                         nn.ModuleDict({"b": nn.Linear(2, 1)}))
    tree[0].register_parameter("bias", None)
    if [id(p) for p in parameters_of(tree)] != [id(p) for p in tree.parameters()]:
        raise _fail("nn.Module._parameters and _modules", "the parameters listed from them differ from parameters()")
    param = nn.Parameter(torch.zeros(2))
    before = version_sum([param])
    with torch.no_grad():
        param.add_(1)
        torch._foreach_add_([param], [torch.ones(2)])
    if version_sum([param]) < before + 2:
        raise _fail("Tensor._version", "an in-place update (plain or foreach) does not move the version counter")


def check_compile_internals() -> None:
    """Check the patterns of ``torch.compile`` (its module wrapper and its autograd node) against the installed
    torch. Apart from :func:`check_internals` because compiling takes seconds.

    Raises:
        TorchInternalsError: A pattern stopped matching; the message names it and the torch version.
    """
    layer = nn.Linear(3, 2)
    compiled = torch.compile(layer, backend="aot_eager")
    if compiled_original(compiled) is not layer or compiled_original(layer) is not None:
        raise _fail("OptimizedModule._orig_mod", "the module torch.compile wrapped is not found")
    if not hasattr(functorch_config, "donated_buffer"):
        raise _fail("torch._functorch.config.donated_buffer", "the option is missing")
    with without_donated_buffers():
        if functorch_config.donated_buffer:
            raise _fail("torch._functorch.config.patch(donated_buffer=False)", "the option is not switched off")
    def region(x: Tensor, weight: Tensor) -> Tensor:
        return torch.tanh(x @ weight)

    output = torch.compile(region, backend="aot_eager")(torch.randn(4, 3), torch.randn(3, 2, requires_grad=True))
    if not is_compiled_node(output.grad_fn):
        raise _fail(f"the node of a compiled region ({_COMPILED_NODE})",
                    f"a compiled region's output has {type(output.grad_fn).__name__}")
