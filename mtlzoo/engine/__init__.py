"""The engine: the only package that asks autograd for per-task gradients, and the one place where
gradients reach the model.

A training forward of a strategy that reads gradients feeds every head its own detached copy
("leaf") of the backbone output ``z`` and keeps a record (:mod:`~mtlzoo.engine.forwards`). A
backward (:func:`~mtlzoo.engine.step.backpropagate`) then runs in three moves:

1. the heads' pass (:mod:`~mtlzoo.engine.heads`): one ``autograd.grad`` of ``sum_k w_k L_k`` through the heads gives
   every head parameter its gradient and every leaf ``k`` the task's ``g_k = d(w_k L_k)/dz``, for all K tasks at once,
   without touching ``.grad`` yet (a refused step leaves no trace);
2. the statistics the strategy's request names (:mod:`~mtlzoo.engine.statistics`), formed here
   and only here: the K x ... gradients on ``z``; the K x n Jacobian on the shared parameters by
   one vmapped vector-Jacobian product (:mod:`~mtlzoo.engine.jacobian`); Gramians; norms, on the
   last shared layer without a backward where it is linear (:mod:`~mtlzoo.engine.last_layer`);
3. the strategy's update as gradients (:mod:`~mtlzoo.engine.update`), then one ``torch.autograd.backward`` over every
   root of the step (``z`` with the combined ``dz``, the heads' parameters with their gradients, the strategy's
   objective, the backbone's own loss), so gradients reach ``.grad`` through autograd's accumulation: hooks,
   ``DistributedDataParallel`` and a ``GradScaler`` see them as after a plain backward.

The same step for a model that is not a backbone plus heads, given the losses, the shared
representation and the shared parameters: :func:`mtlzoo.engine.functional.backward`
(``mtlzoo.engine.backward``). When the state advances is :mod:`~mtlzoo.engine.lifecycle`'s
concern. Every read of torch's graph or module internals is in :mod:`~mtlzoo.engine.internals`, with a self-test.

A cross-task loss (one that reads two heads' predictions) makes leaf ``k`` carry the gradient of
every loss that reads head ``k``, not of ``L_k`` alone. Parameters outside the model that a loss
reads (a learnable loss) get no gradient on the gradient paths: put them in a head.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    """``mtlzoo.engine.backward``, the functional face (:mod:`mtlzoo.engine.functional`), imported on first use
    so that importing a module of the engine does not import the strategies' base class."""
    if name == "backward":
        from mtlzoo.engine.functional import backward

        return backward
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
