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
