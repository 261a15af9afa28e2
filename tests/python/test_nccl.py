"""The NCCL backend: device collectives. Needs a CUDA build of torch and a GPU; skipped otherwise."""
import pytest
import torch

import zeal

needs_gpu = pytest.mark.skipif(
    not (zeal._zeal.with_cuda and torch.cuda.is_available()),
    reason="needs a GPU and a CUDA build of torch (this machine: "
    f"zeal built with CUDA={zeal._zeal.with_cuda}, torch.cuda.is_available()={torch.cuda.is_available()})")


def test_nccl_entry_point_exists_in_cuda_builds():
    assert hasattr(zeal._zeal, "nccl_world") == zeal._zeal.with_cuda


@pytest.fixture(scope="module")
def nccl():
    # One communicator for every case (each new one costs seconds of NCCL setup).
    return zeal._zeal.nccl_world(0, 60.0)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32,
                                   torch.int64, torch.uint8])
@pytest.mark.parametrize("n", [0, 1, 7, (1 << 18) + 3])
def test_nccl_single_rank_collectives(nccl, dtype, n):
    comm = nccl
    assert comm.backend == "nccl" and comm.size == 1
    t = (torch.arange(n) % 5).to(dtype).cuda()
    want = t.clone()
    comm.all_reduce(t, "sum").wait()
    assert torch.equal(t, want)
    out = torch.empty(n, dtype=dtype, device="cuda")
    comm.all_gather(out, t).wait()
    assert torch.equal(out, want)
    comm.broadcast(t, 0).wait()
    comm.barrier().wait()
    with pytest.raises(zeal.CommError, match="backend nccl takes tensors on cuda"):
        comm.all_reduce(torch.ones(3))


@needs_gpu
def test_engine_trains_device_parameters_like_torch():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).cuda()
    reference = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).cuda()
    reference.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    engine, *_ = zeal.initialize(model=model, config={
        "train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}}})
    g = torch.Generator(device="cuda").manual_seed(1)
    for _ in range(5):
        x = torch.randn(4, 8, device="cuda", generator=g)
        loss = engine(x).pow(2).mean()
        engine.backward(loss)
        engine.step()
        opt.zero_grad()
        reference(x).pow(2).mean().backward()
        opt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert p.is_cuda
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
