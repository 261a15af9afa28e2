"""zeal.optim.FusedAdam (multi-tensor CUDA kernel) against torch.optim.AdamW on the same GPU.
The numeric tests need a GPU and skip without one; the error test runs everywhere."""
import pytest
import torch

import zeal

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
SIZES = [0, 1, 15, 16, 17, 65535, 65536, 65537, 3_000_001] + [100] * 40  # chunk edges; more tensors than one launch


@needs_gpu
def test_fp32_each_step_matches_torch_within_1e6():
    g = torch.Generator().manual_seed(0)
    ours_p = [torch.nn.Parameter(torch.randn(n, generator=g).cuda()) for n in SIZES]
    ref_p = [torch.nn.Parameter(p.detach().clone()) for p in ours_p]
    ours = zeal.optim.FusedAdam(ours_p, lr=1e-2, weight_decay=0.01)
    ref = torch.optim.AdamW(ref_p, lr=1e-2, weight_decay=0.01, foreach=False)
    worst = 0.0
    for step in range(100):
        for a, b in zip(ours_p, ref_p):
            a.grad = torch.randn(a.shape, device="cuda")
            b.grad = a.grad.clone()
        with torch.no_grad():
            for a, b in zip(ours_p, ref_p):
                a.copy_(b)
                if step:
                    ours.state[a]["exp_avg"].copy_(ref.state[b]["exp_avg"])
                    ours.state[a]["exp_avg_sq"].copy_(ref.state[b]["exp_avg_sq"])
        ours.step()
        ref.step()
        for a, b in zip(ours_p, ref_p):
            if b.numel():
                worst = max(worst, ((a - b).abs().max() / b.abs().max()).item())
    assert worst <= 1e-6, f"worst per-step relative error {worst:.3e}"


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_parameters_round_once(dtype):
    # A 16-bit parameter is updated in fp32 from its 16-bit value and rounded once: it must equal
    # the torch fp32 update of the same value, rounded to the dtype, within one rounding step.
    g = torch.Generator().manual_seed(1)
    start = torch.randn(100_003, generator=g).cuda()
    p = torch.nn.Parameter(start.to(dtype))
    grad = torch.randn(100_003, device="cuda")
    p.grad = grad.to(dtype)
    zeal.optim.FusedAdam([p], lr=1e-2).step()
    q = torch.nn.Parameter(start.to(dtype).float())
    q.grad = grad.to(dtype).float()
    torch.optim.AdamW([q], lr=1e-2, weight_decay=0.0).step()
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    assert ((p.float() - q.detach().to(dtype).float()).abs() <= ulp * q.detach().abs() + 1e-6).all()


def test_rejects_cpu_parameters():
    if not hasattr(zeal._zeal, "fused_adam_step"):
        pytest.skip("this Zeal was built without CUDA")
    with pytest.raises(zeal.Error, match="it updates CUDA tensors"):
        zeal.optim.FusedAdam([torch.nn.Parameter(torch.zeros(4))])
    with pytest.raises(zeal.Error, match="it updates CUDA tensors"):
        zeal._zeal.fused_adam_step([torch.zeros(4)], [torch.zeros(4)], [torch.zeros(4)], [torch.zeros(4)],
                                   1e-3, 0.9, 0.999, 1e-8, 0.0, True, True, 1)


# --- FusedLamb -------------------------------------------------------------------------------------

@needs_gpu
def test_fused_lamb_each_step_matches_float64_reference_within_1e6():
    # The same float64 LAMB as the CPU test; many tensors of mixed sizes (chunk edges, more tensors
    # than one launch) so per-tensor norms summed over several blocks and launches are exercised.
    from test_cpu_optim import lamb_reference_step

    g = torch.Generator().manual_seed(6)
    params = [torch.nn.Parameter(torch.randn(n, generator=g).cuda()) for n in SIZES]
    opt = zeal.optim.FusedLamb(params, lr=1e-2, eps=1e-6, weight_decay=0.01)
    ref = [(p.detach().double().clone(), torch.zeros(p.shape, dtype=torch.float64, device="cuda"),
            torch.zeros(p.shape, dtype=torch.float64, device="cuda")) for p in params]
    worst = 0.0
    for step in range(1, 101):
        for p, (rp, rm, rv) in zip(params, ref):
            p.grad = torch.randn(p.shape, device="cuda")
            with torch.no_grad():
                p.copy_(rp)
                if step > 1:
                    opt.state[p]["exp_avg"].copy_(rm)
                    opt.state[p]["exp_avg_sq"].copy_(rv)
            lamb_reference_step(rp, p.grad.double(), rm, rv, step, 1e-2, 0.9, 0.999, 1e-6, 0.01)
        opt.step()
        for p, (rp, _, _) in zip(params, ref):
            if rp.numel():
                worst = max(worst, ((p.double() - rp).abs().max() / rp.abs().max()).item())
    assert worst <= 1e-6, f"worst per-step relative error {worst:.3e}"


@needs_gpu
def test_unscale_and_sum_squares_on_the_gpu_matches_torch():
    g = torch.randn(3_000_001, device="cuda")
    want = (g.double() / 1024).pow(2).sum().item()
    got = zeal._zeal.unscale_and_sum_squares(g, 1 / 1024)
    assert abs(got - want) <= 1e-6 * want
    g[17] = float("nan")
    assert zeal._zeal.unscale_and_sum_squares(g, 1.0) != zeal._zeal.unscale_and_sum_squares(g, 1.0)  # NaN


def test_fused_lamb_rejects_cpu_parameters():
    if not hasattr(zeal._zeal, "fused_lamb_step"):
        pytest.skip("this Zeal was built without CUDA")
    with pytest.raises(zeal.Error, match=r"it updates CUDA tensors \(CPU parameters: CPULamb\)"):
        zeal.optim.FusedLamb([torch.nn.Parameter(torch.zeros(4))])
    with pytest.raises(zeal.Error, match=r"CPU parameters: CPULamb"):
        zeal._zeal.fused_lamb_step([torch.zeros(4)], [torch.zeros(4)], [torch.zeros(4)], [torch.zeros(4)],
                                   1e-3, 0.9, 0.999, 1e-8, 0.0, True, 1, 0.01, 10.0)
