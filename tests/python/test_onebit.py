"""Compressed communication: the error-compensated 1-bit all-reduce (zeal/comm/compressed.h)."""
import pytest

from conftest import run_mpi
from zeal import _zeal


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_compressed_all_reduce_matches_a_float64_reference(world):
    # Sizes 1, 7, 13, 24, 1000, 4099: not divisible by 8 or by the rank count, smaller than the
    # rank count, and a chunk that is all padding. Four steps each, so the error feedback counts.
    proc = run_mpi(world, "onebit_allreduce.py", timeout=240)
    assert proc.stdout.count("ONEBIT-OK") == world, proc.stdout + proc.stderr


@pytest.mark.parametrize("world", [2, 4, 8])
def test_compressed_all_reduce_sends_a_32nd_of_an_fp32_all_reduce(world):
    # A ring all-reduce of fp32 sends 2 (W-1)/W * 4 bytes per element; the 1-bit one 2 (W-1)/W / 8
    # (the all_to_all of worker signs and the all_gather of server signs), plus two scales.
    n = 10_000_000
    fp32 = 2 * (world - 1) / world * 4 * n
    sent = _zeal.compressed_all_reduce_bytes(n, world)
    assert sent == pytest.approx(fp32 / 32, rel=1e-4)
