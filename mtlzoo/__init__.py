"""mtlzoo: multitask-learning strategies for PyTorch behind one interface."""

from mtlzoo.caching import cached
from mtlzoo.hookspecs import hookimpl
from mtlzoo.protocol import Request, StepInputs, Update
from mtlzoo.registry import create, get_strategy, list_strategies, register_strategy
from mtlzoo.roles import (
    Adapter,
    Aggregator,
    DirectionAggregator,
    GradientSurgery,
    GramianAggregator,
    GramianWeightedSurgery,
    LossWeighting,
    WeightingStrategy,
    compose,
)
from mtlzoo.sharing import HardSharing
from mtlzoo.strategy import Paper, Strategy, StrategyInfo
from mtlzoo.wrapper import MTLWrapper

__version__ = "0.1.0"

__all__ = ["Adapter", "Aggregator", "DirectionAggregator", "GradientSurgery", "GramianAggregator",
           "GramianWeightedSurgery", "HardSharing", "LossWeighting", "MTLWrapper", "Paper", "Request", "StepInputs",
           "Strategy", "StrategyInfo", "Update", "WeightingStrategy", "cached", "compose", "create", "get_strategy",
           "hookimpl", "list_strategies", "register_strategy"]
