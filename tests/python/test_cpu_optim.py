"""Zeal's CPU optimizers against their references, fp32, each step within 1e-6 relative from the
same state, 100 steps: CPUAdam vs torch.optim.Adam / AdamW, CPUAdagrad vs torch.optim.Adagrad, the
SGD kernel vs torch.optim.SGD (momentum, dampening, nesterov), CPULamb vs a float64 LAMB. Sizes
around every vector width and one large tensor in the same optimizer; with and without weight
decay; state_dict round trip; clear errors."""
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


def per_step_error(ours_p, ref_p, ours, ref, sync_state, steps=100, seed=3):
    """Worst per-step relative error: before each step our parameters and states take torch's."""
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for step in range(steps):
        for a, b in zip(ours_p, ref_p):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        with torch.no_grad():
            for a, b in zip(ours_p, ref_p):
                a.copy_(b)
                if step > 0:
                    sync_state(ours.state[a], ref.state[b])
        ours.step()
        ref.step()
        for a, b in zip(ours_p, ref_p):
            if b.numel():
                worst = max(worst, ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item())
    return worst


def test_adagrad_each_step_matches_torch_within_1e6():
    ours_p, ref_p = make_params(), make_params()
    ours = zeal.optim.CPUAdagrad(groups(ours_p), lr=0.05, lr_decay=0.01, eps=1e-10, initial_accumulator_value=0.1)
    ref = torch.optim.Adagrad(groups(ref_p), lr=0.05, lr_decay=0.01, eps=1e-10, initial_accumulator_value=0.1,
                              foreach=False)

    def sync(a, b):
        a["sum"].copy_(b["sum"])
        a["step"].copy_(b["step"])
    worst = per_step_error(ours_p, ref_p, ours, ref, sync)
    assert worst <= 1e-6, f"worst per-step relative error {worst:.3e}"


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_kernel_each_step_matches_torch_within_1e6(nesterov):
    ref_p = make_params()
    ref = torch.optim.SGD(ref_p, lr=0.05, momentum=0.9, dampening=0.0 if nesterov else 0.1, weight_decay=0.01,
                          nesterov=nesterov, foreach=False)
    g = torch.Generator().manual_seed(4)
    worst = 0.0
    for step in range(100):
        for p in ref_p:
            p.grad = torch.randn(p.shape, generator=g)
        mine = [p.detach().clone() for p in ref_p]
        bufs = [ref.state[p]["momentum_buffer"].clone() if step else torch.zeros_like(p) for p in ref_p]
        for p, grad, buf in zip(mine, [p.grad for p in ref_p], bufs):
            zeal._zeal.cpu_sgd_step(p, grad, buf, 0.05, 0.9, 0.0 if nesterov else 0.1, 0.01, nesterov, step == 0)
        ref.step()
        for a, b in zip(mine, ref_p):
            if b.numel():
                worst = max(worst, ((a - b).abs().max() / b.abs().max()).item())
    assert worst <= 1e-6, f"worst per-step relative error {worst:.3e}"


def lamb_reference_step(p, g, m, v, step, lr, b1, b2, eps, wd, min_coeff=0.01, max_coeff=10.0):
    """Straightforward LAMB in float64 on one tensor (updates p, m, v in place)."""
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    u = (m / (1 - b1 ** step)) / ((v / (1 - b2 ** step)).sqrt() + eps) + wd * p
    pn, un = p.norm().item(), u.norm().item()
    ratio = min(max_coeff, max(min_coeff, pn / un)) if pn > 0 and un > 0 else 1.0
    p.add_(u, alpha=-lr * ratio)
    return ratio


def test_lamb_each_step_matches_float64_reference_within_1e6():
    params = make_params()
    params.append(torch.nn.Parameter(torch.zeros(40)))  # zero norm: trust ratio 1
    opt = zeal.optim.CPULamb(params, lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)
    ref = [(p.detach().double().clone(), torch.zeros(p.shape, dtype=torch.float64),
            torch.zeros(p.shape, dtype=torch.float64)) for p in params]
    g = torch.Generator().manual_seed(5)
    worst, ratios = 0.0, set()
    for step in range(1, 101):
        for p, (rp, rm, rv) in zip(params, ref):
            p.grad = torch.randn(p.shape, generator=g)
            with torch.no_grad():  # start the step from the reference state
                p.copy_(rp)
                if step > 1:
                    opt.state[p]["exp_avg"].copy_(rm)
                    opt.state[p]["exp_avg_sq"].copy_(rv)
            ratios.add(round(lamb_reference_step(rp, p.grad.double(), rm, rv, step, 1e-2, 0.9, 0.999, 1e-6, 0.01), 6))
        opt.step()
        for p, (rp, _, _) in zip(params, ref):
            if rp.numel() and rp.abs().max() > 0:
                worst = max(worst, ((p.double() - rp).abs().max() / rp.abs().max()).item())
    assert worst <= 1e-6, f"worst per-step relative error {worst:.3e}"
    assert len(ratios) > 10 and 1.0 in ratios  # ratios vary by tensor, and the zero tensor used 1


@pytest.mark.parametrize("n", [0, 1, 15, 17, 4097, 1_000_003])
@pytest.mark.parametrize("inv_scale", [1.0, 1 / 1024])
def test_unscale_and_sum_squares_matches_torch(n, inv_scale):
    # The engine's precision path in one pass: the gradients are unscaled in place and the sum of
    # squares (float blocks, double across blocks) is within 1e-6 of a float64 reference.
    g = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 1000
    want_grads = g * inv_scale
    want = want_grads.double().pow(2).sum().item()
    got = zeal._zeal.unscale_and_sum_squares(g, inv_scale)
    assert torch.equal(g, want_grads)
    assert abs(got - want) <= 1e-6 * max(want, 1e-30)


def test_unscale_and_sum_squares_reports_non_finite_gradients():
    for bad in (float("inf"), float("-inf"), float("nan")):
        g = torch.ones(100_000)
        g[77_777] = bad
        total = zeal._zeal.unscale_and_sum_squares(g, 0.5)
        assert not torch.isfinite(torch.tensor(total)), bad
    with pytest.raises(zeal.Error, match="float32"):
        zeal._zeal.unscale_and_sum_squares(torch.ones(4, dtype=torch.float64), 1.0)


def test_every_instruction_set_and_the_16bit_copy_variant_agree_bitwise():
    # The kernels round every operation as written (no contraction into fused multiply-adds), so
    # the result does not depend on the CPU's instruction set, and Adam writing its bf16 / fp16 copy
    # in the same pass updates exactly as without it (ZeRO-Offload publishes that copy).
    g = torch.Generator().manual_seed(9)
    start = [torch.randn(100_003, generator=g) for _ in range(2)] + [torch.randn(100_003, generator=g) * 0.1,
                                                                   torch.rand(100_003, generator=g) * 0.1]
    results = {}
    for isa in ("scalar", "avx2", "avx512"):
        for dtype in (None, torch.bfloat16, torch.float16):
            p, grad, m, v = (t.clone() for t in start)
            copy = None if dtype is None else torch.empty(p.shape, dtype=dtype)
            try:
                zeal._zeal.cpu_adam_step(p, grad, m, v, 1e-3, 0.9, 0.999, 1e-8, 0.01, True, True, 3,
                                         half_copy=copy, isa=isa)
            except zeal.Error as e:
                assert "does not support" in str(e)
                continue
            results[(isa, dtype)] = (p, m, v)
            if copy is not None:
                assert torch.equal(copy, p.to(dtype))
    reference = results[("scalar", None)]
    assert len(results) >= 3
    for key, got in results.items():
        assert all(torch.equal(a, b) for a, b in zip(got, reference)), key


def test_cpu_adam_fp32_optimizer_states_with_bf16_parameters():
    # DeepSpeed's DeepSpeedCPUAdam(fp32_optimizer_states=True): fp32 moments, each step computed in
    # fp32 from the bf16 value and rounded back. The reference does exactly that with torch's AdamW.
    torch.manual_seed(0)
    start = torch.randn(64)
    p = torch.nn.Parameter(start.to(torch.bfloat16))
    ours = zeal.optim.CPUAdam([p], lr=1e-2, weight_decay=0.01, fp32_optimizer_states=True)
    ref_p = torch.nn.Parameter(start.to(torch.bfloat16).float())
    ref = torch.optim.AdamW([ref_p], lr=1e-2, weight_decay=0.01)
    for step in range(5):
        grad = torch.randn(64)
        p.grad = grad.to(torch.bfloat16)
        ref_p.grad = p.grad.float()
        ours.step()
        ref.step()
        with torch.no_grad():
            ref_p.copy_(ref_p.to(torch.bfloat16).float())  # the bf16 rounding of each step
        assert p.dtype == torch.bfloat16 and ours.state[p]["exp_avg"].dtype == torch.float32
        assert torch.allclose(p.float(), ref_p, rtol=0, atol=1e-6), step
    with pytest.raises(zeal.ConfigError, match="fp32_optimizer_states=False"):
        zeal.optim.CPUAdam([torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))], fp32_optimizer_states=False)
