"""The three roles a strategy plays, and their composition.

:class:`LossWeighting` (``scalarize``), :class:`GramianAggregator` (``weigh``) or :class:`DirectionAggregator`
(``combine``), :class:`Adapter` (``adapt``); :func:`compose` makes one strategy of at most one of each;
:mod:`mtlzoo.roles.modifiers` wrap an aggregator (clipping, acting every n steps, smoothing its weights across steps).
"""

from mtlzoo.roles.adapter import Adapter
from mtlzoo.roles.aggregator import (
    Aggregator,
    DirectionAggregator,
    GradientSurgery,
    GramianAggregator,
    GramianWeightedSurgery,
    HostStep,
)
from mtlzoo.roles.composite import Composite, compose
from mtlzoo.roles.modifiers import EMA, ClipNorm, EveryNSteps, Modifier, Normalize, modify
from mtlzoo.roles.weighting import LossWeighting, WeightingStrategy

__all__ = ["EMA", "Adapter", "Aggregator", "ClipNorm", "Composite", "DirectionAggregator", "EveryNSteps",
           "GradientSurgery", "GramianAggregator", "GramianWeightedSurgery", "HostStep", "LossWeighting", "Modifier",
           "Normalize", "WeightingStrategy", "compose", "modify"]
