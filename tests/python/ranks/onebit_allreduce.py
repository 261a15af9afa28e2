"""The compressed 1-bit all-reduce against a float64 reference of the same algorithm.

Every rank makes every rank's inputs (seeded by rank, size and step), so each can run the whole
algorithm in float64 (worker compression with error feedback, server averaging and compression,
the final decode) and compare it with what Zeal's collective wrote into its tensor: the signs
must agree exactly and the values to fp32 rounding (the reference rounds only at the end), and so
must the persisted error buffers, over several steps (the errors carry from step to step)."""
import math
import sys

import torch

import zeal
from zeal import _zeal

SIZES = [1, 7, 13, 24, 1000, 4099]
STEPS = 4


def inputs(rank, n, step):
    g = torch.Generator().manual_seed(1000 * rank + 17 * n + step)
    return torch.randn(n, generator=g, dtype=torch.float64) * (1.0 + rank)


def reference(world, n, steps):
    """Yields, per step, the decoded tensor (float64) and the worker and server errors."""
    padded = max(math.ceil(max(n, 1) / (8 * world)) * 8 * world, 8 * world)
    chunk = padded // world
    werr = [torch.zeros(padded, dtype=torch.float64) for _ in range(world)]
    serr = [torch.zeros(chunk, dtype=torch.float64) for _ in range(world)]
    for step in range(steps):
        signs, scales = [], []
        for j in range(world):
            c = torch.zeros(padded, dtype=torch.float64)
            c[:n] = inputs(j, n, step) + werr[j][:n]
            scale = math.sqrt(float((c[:n] ** 2).sum()) / n) if n else 0.0
            sign = torch.where(c >= 0, 1.0, -1.0).double()
            werr[j] = torch.where(torch.arange(padded) < n, c - scale * sign, torch.zeros_like(c))
            signs.append(sign)
            scales.append(scale)
        out = torch.zeros(padded, dtype=torch.float64)
        for r in range(world):
            lo, hi = r * chunk, (r + 1) * chunk
            avg = sum(scales[j] * signs[j][lo:hi] for j in range(world)) / world
            valid = min(max(n - lo, 0), chunk)
            c = avg + serr[r]
            c[valid:] = 0.0
            scale = math.sqrt(float((c[:valid] ** 2).sum()) / valid) if valid else 0.0
            sign = torch.where(c >= 0, 1.0, -1.0).double()
            serr[r] = torch.where(torch.arange(chunk) < valid, c - scale * sign, torch.zeros_like(c))
            out[lo:hi] = scale * sign
        yield out[:n], werr, serr


def main():
    comm = zeal.world(timeout_s=60)
    rank, world = comm.rank, comm.size
    for n in SIZES:
        state = _zeal.OneBitState()
        for step, (want, werr, serr) in enumerate(reference(world, n, STEPS)):
            got = inputs(rank, n, step).float()
            _zeal.compressed_all_reduce(comm, got, state)
            where = f"n={n} step={step} rank={rank}/{world}"
            assert torch.equal(torch.sign(got.double()).clamp(min=0), torch.sign(want).clamp(min=0)), f"signs differ, {where}"
            assert torch.allclose(got.double(), want, rtol=2e-6, atol=1e-7), \
                f"values differ by {(got.double() - want).abs().max().item():.3e}, {where}"
            assert torch.allclose(state.worker_error.double(), werr[rank], rtol=1e-5, atol=1e-5), f"worker error, {where}"
            assert torch.allclose(state.server_error.double(), serr[rank], rtol=1e-5, atol=1e-5), f"server error, {where}"
    print(f"ONEBIT-OK rank {rank}", flush=True)


if __name__ == "__main__":
    main()
    sys.stdout.flush()
