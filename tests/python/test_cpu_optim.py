"""zeal.optim.CPUAdam against torch.optim.Adam / AdamW: fp32, each step within 1e-6 relative of
torch's from the same state, 100 steps; sizes around every vector width and one large tensor in
the same optimizer; with and without weight decay; state_dict round trip; clear errors."""
import pytest
import torch

import zeal

SIZES = [0, 1, 15, 16, 17, 31, 33, 1_000_003]


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(n, generator=g)) for n in SIZES]


def groups(params):
    # Half the tensors decay, half do not.
    return [{"params": params[0::2], "weight_decay": 0.05}, {"params": params[1::2], "weight_decay": 0.0}]


@pytest.mark.parametrize("adamw", [True, False])
def test_each_step_matches_torch_within_1e6(adamw):
    ours_p, ref_p = make_params(), make_params()
    ours = zeal.optim.CPUAdam(groups(ours_p), lr=1e-2, betas=(0.9, 0.99), eps=1e-8, adamw_mode=adamw)
    ref = (torch.optim.AdamW if adamw else torch.optim.Adam)(groups(ref_p), lr=1e-2, betas=(0.9, 0.99), eps=1e-8,
                                                              foreach=False)
    g = torch.Generator().manual_seed(1)
    worst = 0.0
    for step in range(100):
        for a, b in zip(ours_p, ref_p):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        # Start each step from torch's state, so the check is per step, not accumulated drift.
        with torch.no_grad():
            for a, b in zip(ours_p, ref_p):
                a.copy_(b)
                if step > 0:
                    ours.state[a]["exp_avg"].copy_(ref.state[b]["exp_avg"])
                    ours.state[a]["exp_avg_sq"].copy_(ref.state[b]["exp_avg_sq"])
        ours.step()
        ref.step()
        for a, b in zip(ours_p, ref_p):
            if b.numel():
                worst = max(worst, ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item())
    assert worst <= 1e-6, f"worst per-step relative error {worst:.3e}"


def test_hundred_steps_stay_close_and_state_dict_round_trips():
    ours_p, ref_p = make_params(), make_params()
    ours = zeal.optim.CPUAdam(ours_p, lr=1e-3, weight_decay=0.01)
    ref = torch.optim.AdamW(ref_p, lr=1e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(2)
    for step in range(100):
        for a, b in zip(ours_p, ref_p):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        ours.step()
        ref.step()
        if step == 49:  # replace the optimizer by one restored from its state_dict
            saved = ours.state_dict()
            ours = zeal.optim.CPUAdam(ours_p, lr=1e-3, weight_decay=0.01)
            ours.load_state_dict(saved)
    diff = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(ours_p, ref_p) if b.numel())
    assert diff <= 1e-5, f"relative difference after 100 steps {diff:.3e}"
    assert zeal.optim.CPUAdam.isa() in ("avx512", "avx2", "scalar")


def test_clear_errors():
    with pytest.raises(zeal.Error, match="dtype torch.float64"):
        zeal.optim.CPUAdam([torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))])
    with pytest.raises(zeal.Error, match="on meta"):
        zeal.optim.CPUAdam([torch.nn.Parameter(torch.zeros(4, device="meta"))])
    with pytest.raises(zeal.ConfigError, match="amsgrad"):
        zeal.optim.CPUAdam([torch.nn.Parameter(torch.zeros(4))], amsgrad=True)
