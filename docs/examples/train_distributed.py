"""A CNN with named heads trained on every rank's share of each batch, with any mtlzoo strategy.

Run it with ``torchrun --standalone --nproc_per_node=2 train_distributed.py [strategy]`` (one process:
``--nproc_per_node=1``); the data are made up here, so it needs no download.
"""

import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.functional import cross_entropy, mse_loss
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import mtlzoo

BATCH = 64  # the whole batch, over all ranks


def synthetic_images(count: int) -> TensorDataset:
    """16 x 16 noise, one quadrant brightened; tasks: which quadrant (4 classes), and the image's contrast."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(count, 1, 16, 16, generator=generator) * torch.rand(count, 1, 1, 1, generator=generator)
    quadrant = torch.randint(0, 4, (count,), generator=generator)
    for index, (row, column) in enumerate([(0, 0), (0, 8), (8, 0), (8, 8)]):
        images[quadrant == index, :, row:row + 8, column:column + 8] += 1.0
    return TensorDataset(images, quadrant, images.std((1, 2, 3)))


def main() -> None:
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")  # torchrun's environment
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)

    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
    heads = {"quadrant": nn.Linear(64, 4), "contrast": nn.Linear(64, 1)}
    strategy = sys.argv[1] if len(sys.argv) > 1 else "upgrad"
    options = {"rotation_shape": 64} if strategy.startswith("roto") or strategy == "rotate_only" else {}
    mtl = mtlzoo.MTLWrapper(mtlzoo.HardSharing(backbone, heads), strategy, **mtlzoo.get_strategy(
        strategy).info.suggested, **options).to(device)
    ddp = nn.parallel.DistributedDataParallel(mtl)  # the whole wrapper: the model's gradients are averaged
    optimizer = torch.optim.SGD(mtl.parameters(), lr=0.05, momentum=0.9)

    dataset = synthetic_images(512)
    sampler = DistributedSampler(dataset, shuffle=True, seed=0, drop_last=True)  # rank r's share of each batch
    loader = DataLoader(dataset, batch_size=BATCH // world, sampler=sampler, drop_last=True)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        for step, (x, quadrant, contrast) in enumerate(loader):
            optimizer.zero_grad()
            predictions = ddp(x.to(device))  # through DDP, not mtl(x)
            losses = {"quadrant": cross_entropy(predictions["quadrant"], quadrant.to(device)),
                      "contrast": mse_loss(predictions["contrast"].squeeze(1), contrast.to(device))}
            mtl.backward(losses)  # the strategy reads the whole batch's losses and gradients
            mtl.step(optimizer)
            whole = torch.stack([loss.detach() for loss in losses.values()])
            dist.all_reduce(whole)  # for printing: the whole batch's losses are the mean of the ranks'
            if rank == 0:
                print(f"epoch {epoch} step {step:2d}", *(f"{name} {value:.6f}" for name, value
                                                         in zip(losses, (whole / world).tolist())))
        mtl.end_epoch()
    if rank == 0:  # every rank holds the same model and strategy state: save rank 0's
        torch.save(mtl.state_dict(), os.environ.get("CHECKPOINT", os.devnull))
    dist.barrier()  # no rank tears the group down while another still uses it (gloo aborts then)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
