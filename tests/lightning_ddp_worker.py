"""Lightning fits under ``strategy="ddp"`` on 2 CPU processes (gloo), for tests/test_lightning.py.

``python tests/lightning_ddp_worker.py OUT NAME...`` trains ``tests.test_lightning.Net(NAME)`` for 3 steps per
name, each rank on its share of every batch (Lightning's DistributedSampler), and saves each rank's state
dict as ``OUT/NAME.rank<r>.pt``. Lightning starts the second process by running this script again.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(out: Path, names: list[str]) -> None:
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader

    from tests.test_lightning import BATCH, DDP_STRATEGIES, Net, data

    for name in names:
        net = Net(name, **DDP_STRATEGIES[name])
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=3, logger=False,
                             enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
        trainer.fit(net, DataLoader(data(6), batch_size=BATCH))
        torch.save(net.state_dict(), out / f"{name}.rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
