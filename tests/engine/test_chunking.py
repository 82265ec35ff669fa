"""Issue 19, item 10: what ``jacobian_chunk_size`` bounds, as the docs say it (the K x n Jacobian is formed
whatever the chunk; the batched backward's working memory falls with the chunk)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import mtlzoo


def peak_bytes(chunk: int | None, batch: int) -> int:
    """Peak of the running sum of the CPU allocator's allocations and frees during one backward."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 16))
    mtl = mtlzoo.MTLWrapper(mtlzoo.HardSharing(backbone, [nn.Linear(16, 1) for _ in range(12)]), "upgrad",
                            target="parameters", jacobian_chunk_size=chunk)
    x = torch.randn(batch, 8, generator=torch.Generator().manual_seed(0))
    losses = [p.pow(2).mean() for p in mtl(x)]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        mtl.backward(losses)
    events = sorted((e for e in prof.events() if e.cpu_memory_usage), key=lambda e: e.time_range.start)
    running, peak = 0, 0
    for event in events:
        running += event.cpu_memory_usage
        peak = max(peak, running)
    return peak


def test_where_activations_dominate_the_peak_falls_with_the_chunk() -> None:
    """Batch 2048, 1,000-odd parameters: the activation gradients (K copies) outweigh the 12 x n Jacobian."""
    peaks = {chunk: peak_bytes(chunk, 2048) for chunk in (12, 6, 3, 1)}  # 12: all K at once
    assert peaks[12] > peaks[6] > peaks[3] > peaks[1], peaks



def test_the_docstring_promises_no_bound_on_the_jacobian() -> None:
    """The old docstring said the peak is bounded by the chunk rather than by K, which the Jacobian contradicts."""
    doc = mtlzoo.MTLWrapper.__doc__ or ""
    assert "bounded by the chunk rather than by K" not in doc
    assert "not the K x n Jacobian" in doc


def test_the_default_on_the_cpu_is_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """``jacobian_chunk_size=None`` on the CPU runs one backward per task (measured faster there than the batched
    one, docs/performance.md); an explicit chunk batches."""
    batched: list[bool] = []
    original = torch.autograd.grad

    def spy(*args: object, **kwargs: object) -> object:
        batched.append(bool(kwargs.get("is_grads_batched")))
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.autograd, "grad", spy)
    for chunk, expected in ((None, False), (12, True)):
        batched.clear()
        torch.manual_seed(0)
        backbone = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        mtl = mtlzoo.MTLWrapper(mtlzoo.HardSharing(backbone, [nn.Linear(4, 1) for _ in range(12)]), "upgrad",
                                target="parameters", jacobian_chunk_size=chunk)
        mtl.backward([p.pow(2).mean() for p in mtl(torch.randn(32, 8))])
        assert any(batched) is expected, (chunk, batched)
