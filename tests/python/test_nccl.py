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


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32,
                                   torch.int64, torch.uint8])
@pytest.mark.parametrize("n", [0, 1, 7, (1 << 18) + 3])
def test_nccl_single_rank_collectives(dtype, n):
    comm = zeal._zeal.nccl_world(0, 60.0)
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
