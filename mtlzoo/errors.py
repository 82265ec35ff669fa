"""The exceptions and warnings mtlzoo raises, one class per kind of mistake.

Every class derives from :class:`MTLZooError` and from the builtin exception a caller would
naturally catch (``KeyError`` for an unknown name, ``ValueError`` for bad values, ...), so
``except KeyError`` and ``except mtlzoo.errors.MTLZooError`` both work.
"""

from __future__ import annotations


class MTLZooError(Exception):
    """Base class of every error mtlzoo raises."""


class _Unquoted(KeyError):
    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


class UnknownStrategyError(MTLZooError, _Unquoted):
    """A strategy name that no registered strategy has (the message lists close matches)."""


class DuplicateNameError(MTLZooError, ValueError):
    """A name or alias that a registry (of strategies, of problems) already holds (the message names both origins)."""


class DuplicateStrategyError(DuplicateNameError):
    """A strategy name or alias that is already taken (the message names both origins)."""


class InvalidStrategyError(MTLZooError, TypeError):
    """Something registered as a strategy that is not a usable ``Strategy`` subclass."""


class InvalidPluginError(MTLZooError, TypeError):
    """A plugin whose hook mtlzoo cannot use (e.g. a hook wrapper); the message names the plugin."""


class UnknownHyperparameterError(MTLZooError, TypeError):
    """A keyword a strategy's constructor does not take (the message lists its hyperparameters and close matches)."""


class MissingHyperparameterError(MTLZooError, TypeError):
    """A hyperparameter without a default that was not given (the message names the strategy and the parameter)."""


class InvalidModelError(MTLZooError, TypeError):
    """A model that does not expose a ``backbone`` module and a non-empty ``heads`` collection."""


class LossError(MTLZooError, ValueError):
    """Losses handed to ``MTLWrapper.backward`` that are not K finite scalars of this step."""


class BackwardOrderError(MTLZooError, RuntimeError):
    """``backward`` called without a training-mode forward pass of the same step."""


class NotMaterializedError(MTLZooError, RuntimeError):
    """A lazily shaped strategy asked for its parameters before its shape is known."""


class ShapeMismatchError(MTLZooError, ValueError):
    """A tensor whose shape does not fit what the strategy was configured or materialised with."""


class PluginWarning(UserWarning):
    """A third-party plugin that could not be loaded, or a strategy of it that was refused."""


class ReusedBatchWarning(UserWarning):
    """A strategy that reads several independent batches per step was given fewer: the given batches' statistics
    stand in for the missing ones (said once per strategy)."""


class NonFiniteGradientError(MTLZooError, FloatingPointError):
    """Finite losses whose gradients, or a strategy's update from them, are not finite (nothing was applied)."""


class NonPositiveLossError(MTLZooError, ValueError):
    """A loss <= 0 given to a method that takes its log, a ratio or a product of losses (SI, GLS, DWA, FAMO,
    STCH); the message names the method and the task, and the strategy's state is left unchanged."""


class CheckpointMismatchError(MTLZooError, ValueError):
    """A checkpoint saved with other strategy settings than the strategy it is loaded into (nothing is loaded)."""


class UnknownProblemError(MTLZooError, _Unquoted):
    """A comparison problem name that no registered problem has (the message lists close matches)."""


class ComparisonError(MTLZooError, ValueError):
    """A comparison that cannot run as asked (the message says which and why), raised before any training."""


class DataError(ComparisonError, FileNotFoundError):
    """A data directory that lacks a file a problem reads, or holds one in another format (the message names
    the file and the layout the problem expects)."""


class SolverError(MTLZooError, RuntimeError):
    """An optimisation problem of a strategy that its solver could not solve (the message says which and why)."""


class SolverWarning(RuntimeWarning):
    """A strategy whose problem has no solution for this input (Nash-MTL on a zero gradient), or whose solver
    stopped early; the strategy's docstring says what it returns then."""


class DistributedError(MTLZooError, RuntimeError):
    """A data-parallel step that cannot be the whole batch's (the message names the setting or rank, and the fix)."""
