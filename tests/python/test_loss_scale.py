"""The fp16 loss-scale trajectory under injected overflows follows DeepSpeed's DynamicLossScaler:
start 2^8, window 3, hysteresis 2 (the first overflow after a clean window is absorbed)."""
import json

from conftest import run_mpi


def expected_trajectory(overflow_steps, steps, scale, window, hysteresis):
    """DeepSpeed's update rule, written out independently of Zeal's C++."""
    out, cur_hyst, last_overflow, skipped = [], hysteresis, -1, 0
    for it in range(steps):
        overflow = it in overflow_steps
        if overflow:
            skipped += 1
            if hysteresis == 1 or cur_hyst == 1:
                scale = max(scale / 2, 1)
            else:
                cur_hyst -= 1
            last_overflow = it
        elif (it - last_overflow) % window == 0:
            cur_hyst = hysteresis
            scale *= 2
        out.append((scale, skipped, not overflow))
    return out


import pytest


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_fp16_loss_scale_trajectory_with_injected_overflows(tmp_path, stage):
    # At stage 2 rank 0 sees the inf only through the global norm of the partitioned gradients.
    out = tmp_path / "trajectory.json"
    run_mpi(2, "fp16_overflow.py", "--out", out, "--stage", stage)
    got = [(t["scale"], t["skipped"], t["changed"]) for t in json.loads(out.read_text())]
    want = expected_trajectory({3, 4, 5, 9}, 12, 256.0, 3, 2)
    assert got == want
    # Spelled out: the scale doubles after the third clean step; overflow 3 is absorbed by
    # hysteresis, 4 and 5 halve it; three clean steps double it again, which also restores the
    # hysteresis, so overflow 9 is absorbed too.
    assert [s for s, _, _ in got] == [256, 256, 512, 512, 256, 128, 128, 128, 256, 256, 256, 256]
    assert [c for _, _, c in got] == [True, True, True, False, False, False, True, True, True, False, True, True]
    assert got[-1][1] == 4
