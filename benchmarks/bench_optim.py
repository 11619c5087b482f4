"""Time one LAMB step on a ResNet-50's parameters: ours (engine.optim) vs timm's Lamb, same run.

Each optimizer gets its own copy of timm's resnet50 parameters (25.6 M, decay / no-decay groups)
and the same fixed random gradients. Steps alternate between the optimizers so that load from
other processes hits both alike; the median of ``--steps`` timed steps after ``--warmup`` steps
is reported. timm's ``Lamb`` is timed with its default (on CPU: the per-parameter loop) and, for
reference, with ``foreach=True``. On CUDA our entry is what ``build_optimizer`` returns (apex
``FusedLAMB`` when apex imports) and timings use ``torch.cuda.synchronize``.

    python benchmarks/bench_optim.py [--device cuda] [--steps 15] [--warmup 3] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch
from timm.optim import Lamb as TimmLamb

from common.config import OptimConfig
from engine.optim import build_optimizer, param_groups, uses_apex


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = OptimConfig(name="lamb", lr=5e-3, weight_decay=0.01)  # A1 settings, max_grad_norm 1.0

    torch.manual_seed(0)
    grads = [torch.randn_like(p, device=device) * 2e-4 for p in timm.create_model("resnet50").parameters()]

    def fresh_model():
        torch.manual_seed(0)
        m = timm.create_model("resnet50").to(device)
        for p, g in zip(m.parameters(), grads):
            p.grad = g
        return m

    ours = build_optimizer(fresh_model(), cfg)
    contenders = {
        "ours": ours,
        "timm Lamb": TimmLamb(param_groups(fresh_model(), cfg.weight_decay), lr=cfg.lr),
        "timm Lamb foreach=True": TimmLamb(param_groups(fresh_model(), cfg.weight_decay), lr=cfg.lr, foreach=True),
    }
    times: dict[str, list[float]] = {name: [] for name in contenders}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(args.warmup + args.steps):
        for name, opt in contenders.items():
            sync()
            t0 = time.perf_counter()
            opt.step()
            sync()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)

    n = sum(p.numel() for g in ours.param_groups for p in g["params"])
    print(f"device {device} ({torch.get_num_threads()} threads), torch {torch.__version__}, timm {timm.__version__}, "
          f"resnet50 {n / 1e6:.1f} M params, median of {args.steps} steps after {args.warmup}")
    print(f"ours: {type(ours).__module__}.{type(ours).__name__}, apex used: {uses_apex(ours)}")
    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    for name, ms in med.items():
        print(f"  {name:24s} {ms:8.2f} ms/step   (min {min(times[name]) * 1e3:.2f})")
    print(f"speedup ours vs timm Lamb: {med['timm Lamb'] / med['ours']:.2f}x "
          f"(vs timm foreach=True: {med['timm Lamb foreach=True'] / med['ours']:.2f}x)")
    floor = memory_floor_ms(n, device, sync, args.steps)
    print(f"memory-traffic floor of any LAMB step (11 passes over {n * 4 / 1e6:.0f} MB, measured with torch "
          f"copy/sum on this device): {floor:.2f} ms/step -> at most {med['timm Lamb'] / floor:.2f}x faster than timm Lamb")


def memory_floor_ms(n: int, device: torch.device, sync, repeats: int) -> float:
    """The least time any LAMB step can take on this device, from its memory traffic alone.

    LAMB's trust ratio needs the norm of the whole update of a tensor before the tensor can be
    written, and the clip needs the global grad norm before the moments, so even a perfectly fused
    implementation makes three passes: read g (global norm); read g, m, v, w and write m, v (moments,
    update norms); read m, v, w and write w (apply). That is 8 tensor reads and 3 writes of n fp32
    elements. A pass that reads one tensor is timed as ``sum`` and one that reads and writes as
    ``copy_``, both over n elements (medians), so floor = 3 copies + 5 reads.
    """
    a = torch.randn(n, device=device)
    b = torch.randn(n, device=device)
    reads, copies = [], []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        a.sum()
        sync()
        reads.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        a.copy_(b)
        sync()
        copies.append(time.perf_counter() - t0)
    return (3 * statistics.median(copies) + 5 * statistics.median(reads)) * 1e3


if __name__ == "__main__":
    main()
