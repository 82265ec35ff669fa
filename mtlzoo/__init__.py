"""mtlzoo: multitask-learning strategies for PyTorch behind one interface."""

from mtlzoo.caching import cached
from mtlzoo.hookspecs import hookimpl
from mtlzoo.protocol import Request, StepInputs, Update
from mtlzoo.registry import create, get_strategy, list_strategies, register_strategy
from mtlzoo.strategy import GradientSurgery, GramianWeightedSurgery, Paper, Strategy, StrategyInfo, WeightingStrategy
from mtlzoo.wrapper import HardSharing, MTLWrapper

__version__ = "0.1.0"

__all__ = [
    "GradientSurgery",
    "GramianWeightedSurgery",
    "HardSharing",
    "MTLWrapper",
    "Paper",
    "Request",
    "StepInputs",
    "Strategy",
    "StrategyInfo",
    "Update",
    "WeightingStrategy",
    "cached",
    "create",
    "get_strategy",
    "hookimpl",
    "list_strategies",
    "register_strategy",
]
