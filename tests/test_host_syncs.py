"""The CUDA path without a GPU: no host syncs between log points, stage 2 launches a batch-size
independent number of ops, and ``train.compile`` compiles once per resolution without graph breaks.

Syncs are counted by ``tests/helpers/host_sync.py`` (device tensors tracked through every op on CPU). The
step is the engine's own (``engine.step.train_one_epoch``) with A1's settings: RandAugment
rand-m7-mstd0.5-inc1, mixup 0.2 / CutMix 1.0, BCE with target threshold 0.2 and smoothing 0.1,
LAMB with its internal clip, stochastic depth, an EMA; stage 2 on its torch backend and LAMB
with its clip factor on the device, which is what a CUDA batch takes (on CPU the engine picks
compiled kernels and host-side scalars, which are free there).
"""
from __future__ import annotations

import pytest
import torch

from engine.setup import compile_for_training
from engine.state import EpochProgress
from engine.step import train_one_epoch
from pipelines.augment import Stage2
from pipelines.augment import randaugment as RA
from tests.helpers.host_sync import HostSyncCounter
from tests.helpers.steps import Feed, a1_small, device_batches, step_context


def _count_syncs(cfg, steps: int, log_every: int, accum: int = 1) -> HostSyncCounter:
    ctx, stage2 = step_context(cfg, steps, accum)
    counter = HostSyncCounter()
    with counter:
        counter.mark(*ctx.raw_model.parameters(), *ctx.raw_model.buffers(),
                     *ctx.ema.module.parameters(), *ctx.ema.module.buffers())
        for _ in train_one_epoch(ctx, Feed(device_batches(steps * accum, 16, 32), counter), stage2, EpochProgress(),
                                 steps_per_epoch=steps, log_every=log_every):
            pass
    return counter


@pytest.mark.parametrize("precision,accum", [("bf16", 1), ("fp32", 2)])
def test_no_host_sync_between_log_points(precision, accum):
    """Six optimizer steps, a log point every third: the micro-batches of non-log steps read
    nothing back and copy nothing in a blocking way; a log point reads once (the reduced loss
    window); the last micro-batch of the epoch reads once more (the window handed to ``prog``)."""
    steps, log_every = 6, 3
    counter = _count_syncs(a1_small(f"train.precision={precision}"), steps, log_every, accum)
    per_micro = {i: counter.count(i) for i in range(steps * accum)}
    log_micro = {(s + 1) * accum - 1 for s in range(steps) if (s + 1) % log_every == 0}
    quiet = {i: n for i, n in per_micro.items() if i not in log_micro}
    assert all(n == 0 for n in quiet.values()), {i: counter.summary(i) for i, n in quiet.items() if n}
    last = steps * accum - 1
    assert {i: per_micro[i] for i in log_micro} == {i: (2 if i == last else 1) for i in log_micro}, \
        {i: counter.summary(i) for i in log_micro}
    assert set(counter.summary()) == {"read:.tolist()"}


def test_the_counter_sees_what_would_sync_on_cuda():
    """The counter itself: each kind of sync is reported on a device tensor, none for host work."""
    host = torch.arange(6)
    with HostSyncCounter() as c:
        dev = torch.arange(6, dtype=torch.float32, device="cpu")  # explicit device=: a device tensor
        c.label = "host work"
        (host > 2).nonzero(), host.tolist(), float(host.sum()), torch.bincount(host)
        c.label = "device work"
        y = (dev * 2).sum()
        float(y)
        y.item()
        bool(dev[0] > 1)
        dev.tolist()
        dev.cpu()
        dev.nonzero()
        dev[dev > 2]
        torch.bincount(dev.long())
        dev.repeat_interleave(dev.long())
        c.label = "copies"
        host.to(dev.device)
        host.to(dev.device, non_blocking=True)
        torch.tensor([1.0, 2.0], device=dev.device)
    assert c.count("host work") == 0
    assert c.summary("device work") == {"read:aten._local_scalar_dense.default": 3, "read:.tolist()": 1,
                                        "read:.cpu()": 1, "shape:nonzero": 1, "shape:index with a boolean mask": 1,
                                        "shape:bincount": 1, "shape:repeat_interleave": 1}
    assert c.summary("copies") == {"h2d:Tensor.to(device) without non_blocking": 1,
                                   "h2d:torch.tensor(host data, device=...)": 1}


def _all_ops_params(n: int, policy) -> RA.RandAugmentParams:
    """Draws where every op fires in every layer with both resampling modes, whatever ``n``, so op
    counts compare the batch-size dependence alone."""
    layers, k = policy.num_layers, len(policy.ops)
    idx = torch.arange(n)
    op = torch.stack([(idx + 7 * layer) % k for layer in range(layers)])
    return RA.RandAugmentParams(op=op, apply=torch.ones(layers, n, dtype=torch.bool),
                                magnitude=torch.full((layers, n), 7.0, dtype=torch.float64),
                                sign=torch.where(idx % 2 == 0, 1.0, -1.0).double().expand(layers, n).clone(),
                                bicubic=((idx // k) % 2 == 1).expand(layers, n).clone())


def _stage2_ops(n: int, monkeypatch) -> int:
    cfg = a1_small()
    stage2 = Stage2(cfg.augment, 10, cfg.loss.label_smoothing, train=True, channels_last=True, seed=0,
                    backend="torch")
    monkeypatch.setattr(RA, "sample_params", lambda size, policy, gen: _all_ops_params(size, policy))
    (batch,) = device_batches(1, n, 16)
    stage2(batch)  # warm caches (device constants) as a training loop has
    with HostSyncCounter() as c:
        c.mark(batch.images, batch.labels)
        stage2(batch)
    assert c.count() == 0, c.summary()
    return c.device_ops


def test_stage2_op_count_does_not_grow_with_the_batch(monkeypatch):
    """On a GPU every op on device tensors is a kernel launch: a count that grows with the batch
    would be a Python loop over images. Every op fires at both sizes (30 (layer, op) groups, bilinear and
    bicubic), so the counts compare batch-size dependence only."""
    n32, n256 = _stage2_ops(32, monkeypatch), _stage2_ops(256, monkeypatch)
    print(f"stage 2 ops per call (A1, torch backend): batch 32: {n32}, batch 256: {n256}")
    assert abs(n256 - n32) <= 5, (n32, n256)


def test_compile_once_per_resolution_without_graph_breaks():
    """``train.compile``: the engine's own ``compile_for_training`` over a progressive schedule
    32 -> 48 -> 32 px. Dynamo (which decides graph breaks and recompiles, whatever the backend)
    must capture the whole model step in one graph per resolution and reuse it when a resolution
    comes back. The backend here is ``aot_eager`` (dynamo + AOTAutograd's backward capture, no
    code generation): inductor's C++ code generation of the same graphs takes 60-120 s on this
    project's 2-core CI machine; ``benchmarks/gpu_check.py`` compiles with inductor on a GPU."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cfg = a1_small("train.precision=fp32")
    ctx, stage2 = step_context(cfg, 2, model_wrapper=lambda m: compile_for_training(m, backend="aot_eager"))
    prog = EpochProgress()
    for res in (32, 48, 32):
        for _ in train_one_epoch(ctx, Feed(device_batches(2, 8, res)), stage2, prog, steps_per_epoch=2, log_every=2):
            pass
        prog.epoch, prog.batch = prog.epoch + 1, 0
    breaks = sum(counters["graph_break"].values())
    graphs = counters["stats"]["unique_graphs"]
    print(f"torch.compile over 32/48/32 px: {graphs} graphs, {breaks} graph breaks, "
          f"{counters['frames']['ok']} frames compiled")
    assert breaks == 0, dict(counters["graph_break"])
    assert graphs == 2 and counters["frames"]["ok"] == 2
    torch._dynamo.reset()
