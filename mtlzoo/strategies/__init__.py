"""The built-in strategies, and the internal plugin that registers them like any third-party plugin."""

from __future__ import annotations

from collections.abc import Callable

from mtlzoo.hookspecs import hookimpl
from mtlzoo.strategies.aligned_mtl import AlignedMTL
from mtlzoo.strategies.cagrad import CAGrad
from mtlzoo.strategies.config import ConFIG
from mtlzoo.strategies.db_mtl import DBMTL
from mtlzoo.strategies.dualproj import DualProj
from mtlzoo.strategies.dwa import DynamicWeightAverage
from mtlzoo.strategies.excess_mtl import ExcessMTL
from mtlzoo.strategies.fairgrad import FairGrad
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
from mtlzoo.strategies.moco import MoCo
from mtlzoo.strategies.modo import MoDo
from mtlzoo.strategies.nash_mtl import NashMTL
from mtlzoo.strategies.pcd import PCD
from mtlzoo.strategies.pcgrad import PCGrad
from mtlzoo.strategies.rlw import RandomLossWeighting
from mtlzoo.strategies.rotograd import RotateOnly, RotoGrad, RotoGradNorm
from mtlzoo.strategies.sdmgrad import SDMGrad
from mtlzoo.strategies.si import ScaleInvariant
from mtlzoo.strategies.stch import SmoothTchebycheff
from mtlzoo.strategies.upgrad import UPGrad
from mtlzoo.strategies.uw import UncertaintyWeighting

BUILTIN_STRATEGIES = (LinearScalarization, RotateOnly, RotoGrad, RotoGradNorm,
                      ScaleInvariant, UncertaintyWeighting, DynamicWeightAverage, RandomLossWeighting,
                      GeometricLossStrategy, GradNorm, IMTLL, FAMO, SmoothTchebycheff,
                      MGDA, MGDAUB, PCGrad, GradDrop, GradVac, CAGrad, IMTLG, IMTL, NashMTL, AlignedMTL, UPGrad,
                      DualProj, ConFIG, FairGrad, PCD, ExcessMTL, DBMTL, MoCo, SDMGrad, MoDo)

__all__ = ["BUILTIN_STRATEGIES", "DBMTL", "FAMO", "IMTL", "IMTLG", "IMTLL", "MGDA", "MGDAUB", "PCD", "AlignedMTL",
           "CAGrad", "ConFIG", "DualProj", "DynamicWeightAverage", "ExcessMTL", "FairGrad", "GeometricLossStrategy",
           "GradDrop", "GradNorm", "GradVac", "LinearScalarization", "MoCo", "MoDo", "NashMTL", "PCGrad",
           "RandomLossWeighting", "RotateOnly", "RotoGrad", "RotoGradNorm", "SDMGrad", "ScaleInvariant",
           "SmoothTchebycheff", "UPGrad", "UncertaintyWeighting"]


@hookimpl
def mtlzoo_register_strategies(register: Callable[[type], None]) -> None:
    for cls in BUILTIN_STRATEGIES:
        register(cls)
