"""zeal.moe on a GPU, in one process (expert-parallel size 1): the layer on device tensors against the
same layer on the CPU, and the dropless experts as grouped GEMMs (torch._grouped_mm, the default on
device tensors) against the per-expert loop, in fp32 and bf16. Skipped, with the reason, where there
is no GPU. Multi-rank expert parallelism runs on the CPU (test_multirank.py): a one-GPU machine
cannot give NCCL two ranks. ZEAL_GPU_TEST_DEVICE=cpu runs the same checks on the CPU (to check the
checks where there is no GPU)."""
import os

import pytest
import torch

from zeal.moe.layer import MoE
from zeal.moe.sharded_moe import _grouped_layout, _mlp_experts

DEVICE = os.environ.get("ZEAL_GPU_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                reason=f"needs a GPU (this machine: torch.cuda.is_available()={torch.cuda.is_available()})")


@pytest.fixture(autouse=True)
def exact_fp32():
    # fp32 products in fp32 (no TF32), so the device run can be held to 1e-5 against the CPU.
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def make_layer(hidden, ffn, k, experts=4, seed=0, **kwargs):
    torch.manual_seed(seed)
    expert = torch.nn.Sequential(torch.nn.Linear(hidden, ffn), torch.nn.GELU(), torch.nn.Linear(ffn, hidden))
    layer = MoE(hidden, expert, num_experts=experts, k=k, min_capacity=0, top2_2nd_expert_sampling=False,
                use_rts=False, **kwargs)
    for i, e in enumerate(layer.deepspeed_moe.experts.deepspeed_experts):
        for p in e.parameters():
            p.data.normal_(std=0.2, generator=torch.Generator().manual_seed(10 + i))
    layer.deepspeed_moe.gate.wg.weight.data[experts - 1] = -50.0  # the last expert gets no token (inputs are positive)
    return layer


def run(layer, x):
    x = x.clone().requires_grad_(True)
    out, l_aux, counts = layer(x)
    (out.float().square().sum() + l_aux).backward()
    return out.detach(), l_aux.detach(), counts, x.grad, {n: p.grad for n, p in layer.named_parameters()}


@pytest.mark.parametrize("dropless", [False, True], ids=["capacity", "dropless"])
@pytest.mark.parametrize("k", [1, 2])
def test_layer_on_device_equals_the_layer_on_the_cpu(k, dropless):
    # The same weights and tokens on both sides, nothing dropped (capacity factor 4). On the device
    # the dropless experts run as grouped GEMMs (hidden 64, ffn 128: the layout torch._grouped_mm
    # takes), on the CPU as a loop: output, aux loss, counts and every gradient to 1e-5.
    cpu = make_layer(64, 128, k, capacity_factor=4.0, dropless=dropless)
    gpu = make_layer(64, 128, k, seed=1, capacity_factor=4.0, dropless=dropless).to(DEVICE)
    gpu.load_state_dict(cpu.state_dict())  # (the layer holds its communicator: no deepcopy)
    if dropless:
        assert gpu.deepspeed_moe.grouped_gemm is None and _mlp_experts(gpu.deepspeed_moe.experts.deepspeed_experts)
    x = torch.randn(3, 40, 64, generator=torch.Generator().manual_seed(5)).abs()
    want, got = run(cpu, x), run(gpu, x.to(DEVICE))
    assert got[0].device.type == DEVICE and rel(got[0].cpu(), want[0]) <= 1e-5
    assert abs(got[1].item() - want[1].item()) <= 1e-5 * max(1.0, abs(want[1].item()))
    assert torch.equal(got[2].cpu(), want[2]) and want[2][-1] == 0
    assert rel(got[3].cpu(), want[3]) <= 1e-5
    for name, g in want[4].items():
        if g is None:
            assert got[4][name] is None, name
            continue
        assert rel(got[4][name].cpu(), g) <= 1e-5, name


@pytest.mark.parametrize("tokens", [64, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemm_on_device_equals_the_per_expert_loop(dtype, tokens):
    # torch._grouped_mm against calling each expert on its rows, on the device. 37 tokens: group
    # sizes that are no multiple of 8 (and, for the weight gradient, a row count torch's grouped
    # GEMM does not take: the loop inside the same autograd function). fp32: 1e-5. bf16: both sides
    # round every product's output to bf16 (unit roundoff 2^-8 = 3.9e-3) but accumulate in different
    # orders, so each is held to 2e-2 of an fp32 run of the same bf16 weights and tokens (a few units
    # of roundoff through two GEMMs and the activation), and to each other.
    base = make_layer(128, 256, 2, experts=8, dropless=True)
    layers = [make_layer(128, 256, 2, experts=8, seed=1 + i, dropless=True).to(DEVICE, dtype) for i in range(3)]
    for layer in layers:
        layer.load_state_dict(base.state_dict())
    layers[0].deepspeed_moe.grouped_gemm, layers[1].deepspeed_moe.grouped_gemm = True, False
    x = torch.randn(tokens, 128, generator=torch.Generator().manual_seed(7)).abs().to(DEVICE)
    grouped, loop = run(layers[0], x.to(dtype)), run(layers[1], x.to(dtype))
    assert torch.equal(grouped[2], loop[2]) and grouped[2][-1] == 0
    if dtype == torch.float32:
        assert rel(grouped[0], loop[0]) <= 1e-5
        for name, g in loop[4].items():
            assert rel(grouped[4][name], g) <= 1e-5, name
        return
    exact = layers[2].float()
    exact.load_state_dict(layers[1].state_dict())  # the bf16 weights, in fp32
    want = run(exact, x.to(dtype).float())
    # 64 tokens x 2 routes: 128 rows, a layout torch's grouped GEMM takes in both directions.
    assert _grouped_layout(x.to(dtype), layers[0].deepspeed_moe.experts.deepspeed_experts[0][0].weight) == (tokens == 64)
    for got in (grouped, loop):
        assert rel(got[0], want[0]) <= 2e-2
        for name, g in want[4].items():
            assert rel(got[4][name], g) <= 2e-2, name
    assert rel(grouped[0], loop[0]) <= 2e-2
