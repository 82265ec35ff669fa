"""``qm9``: 11 molecular properties of QM9 (K = 11), through torch_geometric's ``QM9`` data set class."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlzoo.errors import DataError
from mtlzoo.harness.problems.base import Batch, Metric
from mtlzoo.harness.problems.local import LocalBenchmark, missing_file
from mtlzoo.harness.problems.nyuv2 import NASH_MTL
from mtlzoo.sharing import HardSharing
from mtlzoo.wrapper import MTLWrapper

TARGETS = (0, 1, 2, 3, 5, 6, 12, 13, 14, 15, 11)
"""The columns of torch_geometric's ``QM9.y`` that Nash-MTL's code trains on, in its order."""
TASKS = ("mu", "alpha", "homo", "lumo", "r2", "zpve", "U0", "U", "H", "G", "Cv")
MEV = frozenset({"homo", "lumo", "zpve", "U0", "U", "H", "G"})
"""The targets reported in meV (torch_geometric stores eV), as Nash-MTL's code reports them."""
SINGLE_TASK_MAE = (0.0671, 0.1814, 60.576, 53.915, 0.5027, 4.539, 58.838, 64.244, 63.852, 66.223, 0.07212)
"""Nash-MTL's single-task test MAEs (its ``utils.BASE``): the scale of the validation score, as in its code."""
PROCESSED = "processed/data_v3.pt"
LAYOUT = """  processed/data_v3.pt     torch_geometric's processed QM9 (130,831 molecules), as QM9(root) leaves it
  raw/qm9_v3.pt            or what it is processed from: torch_geometric's pre-processed release (no rdkit),
  raw/gdb9.sdf, raw/gdb9.sdf.csv, raw/uncharacterized.txt    or, where rdkit is installed, the raw files
(the root folder of torch_geometric.datasets.QM9; see the comparison guide's QM9 page)"""


def complete_graph(batch: Any) -> tuple[Tensor, Tensor]:
    """Every ordered pair of distinct atoms of each molecule, with the bond's one-hot type (zeros where none) and
    the distance: torch_geometric's ``Complete`` then ``Distance(norm=False)`` as Nash-MTL applies them per
    molecule, here for the whole batch at once on its device."""
    graph, edges, bonds = batch.batch, batch.edge_index, batch.edge_attr
    counts = torch.bincount(graph, minlength=batch.num_graphs)
    first = torch.cumsum(counts, 0) - counts  # each molecule's first atom
    fan = counts[graph]  # each atom's molecule size: its number of pairs as the source
    row = torch.repeat_interleave(torch.arange(len(graph), device=graph.device), fan)
    start = torch.cumsum(fan, 0) - fan  # each atom's first pair
    col = first[graph[row]] + torch.arange(len(row), device=graph.device) - start[row]
    attr = bonds.new_zeros(len(row), bonds.shape[1])
    attr[start[edges[0]] + edges[1] - first[graph[edges[0]]]] = bonds
    keep = row != col
    row, col, attr = row[keep], col[keep], attr[keep]
    distance = (batch.pos[col] - batch.pos[row]).norm(p=2, dim=-1, keepdim=True)
    return torch.stack([row, col]), torch.cat([attr, distance.to(attr.dtype)], dim=1)


class MessagePassing(nn.Module):
    """Nash-MTL's QM9 network up to the representation: a linear embedding, three rounds of an edge-conditioned
    convolution (``NNConv``) with a GRU, Set2Set pooling, a linear layer to ``dim``."""

    def __init__(self, features: int = 11, dim: int = 64) -> None:
        super().__init__()
        from torch_geometric.nn import NNConv, Set2Set

        self.lin0 = nn.Linear(features, dim)
        self.conv = NNConv(dim, dim, nn.Sequential(nn.Linear(5, 128), nn.ReLU(), nn.Linear(128, dim * dim)),
                           aggr="mean")
        self.gru = nn.GRU(dim, dim)
        self.set2set = Set2Set(dim, processing_steps=3)
        self.lin1 = nn.Linear(2 * dim, dim)

    def forward(self, batch: Any) -> Tensor:
        edge_index, edge_attr = complete_graph(batch)
        out = F.relu(self.lin0(batch.x))
        hidden = out.unsqueeze(0)
        for _ in range(3):
            message = F.relu(self.conv(out, edge_index, edge_attr))
            out, hidden = self.gru(message.unsqueeze(0), hidden)
            out = out.squeeze(0)
        return F.relu(self.lin1(self.set2set(out, batch.batch)))


@dataclass(frozen=True)
class QM9(LocalBenchmark):
    """QM9 (Ramakrishnan et al., Scientific Data 2014): 130,831 small molecules, 11 regression targets.

    Source: Nash-MTL's code (Navon et al., *Multi-Task Learning as a Bargaining Game*, ICML 2022,
    ``experiments/quantum_chemistry``, after torch_geometric's ``examples/qm9_nn_conv.py``), as FAMO
    repeats it: the targets mu, alpha, homo, lumo, r2, zpve, U0, U, H, G (the last four the
    atomization energies) and Cv, each standardised with the training set's mean and standard
    deviation; 10,000 test and 10,000 validation molecules; a message-passing network
    (:class:`MessagePassing`) on the complete graph of each molecule, its edges carrying the bond
    type and the interatomic distance, and a linear head per target; the mean squared error of the
    standardised target; Adam at 1e-3, batches of 120, 300 epochs, the rate times 0.7 after 5 epochs
    without a better validation score (down to 1e-5), and the test metrics of the epoch with the
    best validation score. The split is drawn once from ``data_seed`` (Nash-MTL's code draws it
    from the run's seed); every strategy and seed sees the same one. Needs torch_geometric
    (the ``graph`` extra).

    Metrics per target: ``mae``, the test mean absolute error after undoing the standardisation,
    in torch_geometric's units (meV for the energies, as Nash-MTL reports them); lower is better.

    Args:
        data: The root folder of ``torch_geometric.datasets.QM9`` (see :data:`LAYOUT`).
        scale: ``"full"`` or ``"smoke"``.
        workers: Loader worker processes (each collates its batch of molecules).
        batch_size, epochs, lr, lr_schedule: The recipe (Nash-MTL's: 120, 300, 1e-3, plateau(0.7, 5, 1e-5)).
        select_by_validation: Report the test metrics of the epoch with the best validation score,
            Δm% of the validation MAEs against Nash-MTL's single-task MAEs (:data:`SINGLE_TASK_MAE`).
        test_size, val_size: Molecules held out for testing and validation.
        data_seed: Seed of the split.
        eval_batch_size: Batch size of the validation and test passes.
    """

    batch_size: int = 120
    epochs: int = 300
    lr: float = 1e-3
    lr_schedule: str = "plateau(0.7, 5, 1e-5)"
    select_by_validation: bool = True  # type: ignore[misc]
    test_size: int = 10_000
    val_size: int = 10_000
    data_seed: int = 0
    eval_batch_size: int = 512

    name: ClassVar[str] = "qm9"
    summary: ClassVar[str] = "QM9: 11 molecular properties (torch_geometric; Nash-MTL's message-passing net and recipe)"
    source: ClassVar[str] = NASH_MTL
    literature: ClassVar[str] = ("Nash-MTL and FAMO report Δm% of the 11 MAEs against single-task networks; "
                                 "the targets' scales differ by orders of magnitude, and equal weighting is far "
                                 "behind single-task training (the comparison guide's QM9 page)")
    metrics: ClassVar[tuple[Metric, ...]] = (Metric("mae", False, "test mean absolute error (meV for energies)"),)
    requires: ClassVar[tuple[str, ...]] = ("torch_geometric",)
    extra: ClassVar[str | None] = "graph"
    layout: ClassVar[str] = LAYOUT
    default_steps: ClassVar[int] = 300 * 924
    """300 epochs of the 110,831 training molecules in batches of 120 (924 steps)."""
    full_steps: ClassVar[int] = 300 * 924

    @property
    def task_names(self) -> list[str]:
        return list(TASKS)

    def check_data(self) -> None:
        if (self.root / PROCESSED).is_file():
            return
        try:
            import rdkit  # noqa: F401
            raw = ["raw/gdb9.sdf", "raw/gdb9.sdf.csv", "raw/uncharacterized.txt"]
        except ImportError:
            raw = ["raw/qm9_v3.pt"]
        if not all((self.root / name).is_file() for name in raw):
            raise missing_file(self.root, [PROCESSED, *raw], self.layout, self.name)

    @cached_property
    def dataset(self) -> Any:
        """torch_geometric's ``QM9`` at :attr:`root` (processed there on first use; never downloaded)."""
        try:
            from torch_geometric.datasets import QM9 as PygQM9
        except ImportError as error:
            raise ImportError(self.missing_message()) from error
        root, layout, name = self.root, self.layout, self.name

        class LocalQM9(PygQM9):
            def download(self) -> None:  # torch_geometric asks for the raw files even when processed ones exist
                if not (root / PROCESSED).is_file():
                    raise missing_file(root, [PROCESSED], layout, name)

        dataset = LocalQM9(str(root))
        if len(dataset) < self.test_size + self.val_size + 1:
            raise DataError(f"Problem {self.name!r}: {root} holds {len(dataset)} molecules, fewer than test_size + "
                            f"val_size + 1 = {self.test_size + self.val_size + 1}.")
        return dataset

    @cached_property
    def split(self) -> dict[str, Tensor]:
        """The molecules of each split, the standardised targets ``y`` (n, 11) and the training set's ``std``."""
        targets = self.dataset._data.y[:, list(TARGETS)].double()
        order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(self.data_seed))
        test, val, train = order.tensor_split([self.test_size, self.test_size + self.val_size])
        mean, std = targets[train].mean(0), targets[train].std(0)
        return {"train": train, "val": val, "test": test, "y": ((targets - mean) / std).float(), "std": std}

    @property
    def train_size(self) -> int:
        return len(self.dataset) - self.test_size - self.val_size

    def build_model(self) -> HardSharing:
        return HardSharing(MessagePassing(), [nn.Linear(64, 1) for _ in TASKS])

    def fetch(self, split: str, positions: list[int], seed: int | None = None) -> tuple[Any, Tensor]:
        from torch_geometric.data import Batch as Graphs
        from torch_geometric.data import Data

        rows = self.split[split][positions]
        molecules = [self.dataset[int(row)] for row in rows]
        graphs = Graphs.from_data_list([Data(x=m.x, edge_index=m.edge_index, edge_attr=m.edge_attr, pos=m.pos)
                                        for m in molecules])
        return graphs, self.split["y"][rows]

    def epoch(self, generator: torch.Generator) -> Iterator[Batch]:
        self.split  # noqa: B018  (computed before the workers fork)
        yield from super().epoch(generator)

    def losses(self, predictions: Any, targets: Tensor) -> list[Tensor]:
        return [F.mse_loss(p[:, 0], targets[:, k]) for k, p in enumerate(predictions)]

    def mae(self, mtl: MTLWrapper, device: torch.device, split: str) -> Tensor:
        """Each target's mean absolute error on ``split``, in the reported units."""
        total, count = torch.zeros(len(TASKS), dtype=torch.float64), 0
        size = self.limit(len(self.split[split]))
        for graphs, targets in self.loader(split, self.eval_batch_size, size):
            predictions = torch.cat(mtl(graphs.to(device)), dim=1)
            total += (predictions - targets.to(device)).abs().double().sum(0).cpu()
            count += len(targets)
        units = torch.tensor([1000.0 if task in MEV else 1.0 for task in TASKS], dtype=torch.float64)
        return total / count * (self.split["std"] * units)

    def evaluate(self, mtl: MTLWrapper, device: torch.device) -> dict[str, dict[str, float]]:
        return {task: {"mae": float(value)} for task, value in zip(TASKS, self.mae(mtl, device, "test"))}

    def validation_score(self, mtl: MTLWrapper, device: torch.device) -> float:
        """Δm% of the validation MAEs against :data:`SINGLE_TASK_MAE`, as Nash-MTL's code selects and schedules on."""
        base = torch.tensor(SINGLE_TASK_MAE, dtype=torch.float64)
        return float(((self.mae(mtl, device, "val") - base) / base).mean() * 100)
