"""The built-in strategies, and the internal plugin that registers them like any third-party plugin."""

from __future__ import annotations

from collections.abc import Callable

from mtlzoo.hookspecs import hookimpl
from mtlzoo.strategies.aligned_mtl import AlignedMTL
from mtlzoo.strategies.cagrad import CAGrad
from mtlzoo.strategies.dualproj import DualProj
from mtlzoo.strategies.dwa import DynamicWeightAverage
from mtlzoo.strategies.famo import FAMO
from mtlzoo.strategies.gls import GeometricLossStrategy
from mtlzoo.strategies.graddrop import GradDrop
from mtlzoo.strategies.gradnorm import GradNorm
from mtlzoo.strategies.gradvac import GradVac
from mtlzoo.strategies.imtl import IMTL
from mtlzoo.strategies.imtl_g import IMTLG
from mtlzoo.strategies.imtl_l import IMTLL
from mtlzoo.strategies.ls import LinearScalarization
from mtlzoo.strategies.mgda import MGDA, MGDAUB
from mtlzoo.strategies.nash_mtl import NashMTL
from mtlzoo.strategies.pcgrad import PCGrad
from mtlzoo.strategies.rlw import RandomLossWeighting
from mtlzoo.strategies.rotograd import RotateOnly, RotoGrad, RotoGradNorm
from mtlzoo.strategies.si import ScaleInvariant
from mtlzoo.strategies.stch import SmoothTchebycheff
from mtlzoo.strategies.upgrad import UPGrad
from mtlzoo.strategies.uw import UncertaintyWeighting

BUILTIN_STRATEGIES = (LinearScalarization, RotateOnly, RotoGrad, RotoGradNorm,
                      ScaleInvariant, UncertaintyWeighting, DynamicWeightAverage, RandomLossWeighting,
                      GeometricLossStrategy, GradNorm, IMTLL, FAMO, SmoothTchebycheff,
                      MGDA, MGDAUB, PCGrad, GradDrop, GradVac, CAGrad, IMTLG, IMTL, NashMTL, AlignedMTL, UPGrad,
                      DualProj)

__all__ = ["BUILTIN_STRATEGIES", "FAMO", "IMTL", "IMTLG", "IMTLL", "MGDA", "MGDAUB", "AlignedMTL", "CAGrad", "DualProj",
           "DynamicWeightAverage", "GeometricLossStrategy", "GradDrop", "GradNorm", "GradVac", "LinearScalarization",
           "NashMTL", "PCGrad", "RandomLossWeighting", "RotateOnly", "RotoGrad", "RotoGradNorm", "ScaleInvariant",
           "SmoothTchebycheff", "UPGrad", "UncertaintyWeighting"]


@hookimpl
def mtlzoo_register_strategies(register: Callable[[type], None]) -> None:
    for cls in BUILTIN_STRATEGIES:
        register(cls)
