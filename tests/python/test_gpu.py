"""The engine with its parameters on a GPU: one rank under mpirun (the NCCL backend at world size
1), so every device path runs — the bucketed reduction of device gradients, the multi-tensor
FusedAdam / FusedLamb kernels, the fused unscale + inf check + norm kernel, and the host-device
copies of CPU offload. Each run is compared with the plain-torch reference of test_equivalence
(the same model and batches), run on the GPU as well.

Skipped, with the reason, where there is no GPU or Zeal was built without CUDA.
ZEAL_GPU_TEST_DEVICE=cpu runs the same checks on the CPU (to check the checks where there is no GPU)."""
import json
import os
import sys

import pytest
import torch

import zeal
from conftest import RANKS, run_mpi
from test_loss_scale import expected_trajectory

sys.path.insert(0, str(RANKS))
import common  # noqa: E402

DEVICE = os.environ.get("ZEAL_GPU_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(
    DEVICE == "cuda" and not (zeal._zeal.with_cuda and torch.cuda.is_available()),
    reason="needs a GPU and a CUDA build of Zeal and torch (this machine: zeal built with "
    f"CUDA={zeal._zeal.with_cuda}, torch.cuda.is_available()={torch.cuda.is_available()})")

STEPS, BATCH = 20, 16


def max_rel_diff(got, want):
    return max(((g - w).abs().max() / w.abs().max()).item() for g, w in zip(got, want))


def train(tmp_path, *args):
    out = tmp_path / "params.pt"
    run_mpi(1, "dp_train.py", "--steps", STEPS, "--micro", BATCH, "--bucket", 100, "--device", DEVICE,
            "--out", out, *args)
    return torch.load(out)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_fp32_device_parameters_match_torch(tmp_path, stage):
    # fp32 AdamW with clipping: FusedAdam on the device master weights; the global norm from the
    # device kernel. The reference runs on the same GPU, so only summation order differs.
    result = train(tmp_path, "--stage", stage, "--clip", 1.0)
    assert result["param_device"].startswith(DEVICE) and result["master_device"].startswith(DEVICE)
    want = common.reference_run(STEPS, BATCH, lr=1e-2, weight_decay=0.01, clip=1.0, device=DEVICE)
    diff = max_rel_diff(result["params"], want)
    assert diff <= 1e-5, f"max relative parameter difference {diff:.3e}"
    start = [p.detach() for p in common.make_model().parameters()]
    assert max_rel_diff(result["params"], start) > 1e-2  # it really trained


@pytest.mark.parametrize("stage", [0, 2])
def test_lamb_on_device_matches_reference(tmp_path, stage):
    # FusedLamb: the trust ratio per tensor, whole even where ZeRO cuts the tensor.
    result = train(tmp_path, "--stage", stage, "--optimizer", "lamb")
    want = common.reference_run(STEPS, BATCH, lr=1e-2, weight_decay=0.01, clip=0.0, optimizer="lamb", device=DEVICE)
    diff = max_rel_diff(result["params"], want)
    assert diff <= 1e-5, f"max relative parameter difference {diff:.3e}"


@pytest.mark.parametrize("stage,offload_param", [(1, None), (2, None), (3, None), (3, "cpu")])
def test_cpu_offload_of_device_parameters_matches_torch(tmp_path, stage, offload_param):
    # ZeRO-Offload: gradients copied device -> pinned host as buckets complete, the step on the CPU
    # kernels, updated parameters copied back; with offload_param the stage-3 shards live on the host.
    args = ["--stage", stage, "--clip", 1.0, "--offload", "cpu"]
    if offload_param:
        args += ["--offload_param", offload_param]
    result = train(tmp_path, *args)
    assert result["master_device"] == "cpu" and result["param_device"].startswith(DEVICE)
    want = common.reference_run(STEPS, BATCH, lr=1e-2, weight_decay=0.01, clip=1.0, device=DEVICE)
    diff = max_rel_diff(result["params"], want)
    assert diff <= 1e-5, f"max relative parameter difference {diff:.3e}"


@pytest.mark.parametrize("offload_param", [None, "cpu"])
def test_frozen_parameters_stored_quantized_on_device_match_the_cpu(tmp_path, offload_param):
    # Stage 3 with the first layer frozen and zero_quantized_nontrainable_weights (Note [Frozen
    # parameters]): on the device its chunks are quantized by the CUDA kernel (bit for bit the CPU's)
    # and dequantized after each gather; with offload_param cpu the stored messages live in host
    # memory and move to the device per gather. The run equals the same run on the CPU (the CPU path
    # is checked against torch in ranks/zeropp_frozen.py), to 1e-5.
    args = ["--stage", 3, "--freeze_first", "--quantized_frozen"] + (["--offload_param", offload_param] if offload_param else [])
    got = train(tmp_path, *args)
    out = tmp_path / "cpu.pt"
    run_mpi(1, "dp_train.py", "--steps", STEPS, "--micro", BATCH, "--bucket", 100, "--device", "cpu", "--out", out, *args)
    want = torch.load(out)
    assert got["param_device"].startswith(DEVICE)
    diff = max_rel_diff(got["params"], want["params"])
    assert diff <= 1e-5, f"max relative parameter difference {diff:.3e}"
    # the frozen layer holds its quantized values, not the model's (8-bit blocks moved it)
    first = common.make_model()[0].weight.detach()
    moved = (got["params"][0] - first).abs().max().item()
    assert 0 < moved <= first.abs().max().item() / 254 + 1e-7, moved


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("stage", [0, 2])
def test_16bit_on_device_within_torch_drift(tmp_path, precision, stage):
    # As test_equivalence's bf16 test: a 16-bit run drifts from the fp32 run, and Zeal's may end no
    # farther from it than 1.5x the drift of torch's own run in that precision (fp32 master weights,
    # AdamW) on the same GPU. fp16 runs at loss scale 2^12 (dp_train's initial_scale_power; these
    # gradients never overflow it), so torch's fp16 run scales its loss the same way: unscaled, the
    # small fp16 gradients lose bits to underflow and torch's run drifts less far than it should.
    result = train(tmp_path, "--stage", stage, "--precision", precision)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    fp32 = common.reference_run(STEPS, BATCH, lr=1e-2, weight_decay=0.01, clip=0.0, device=DEVICE)
    same = common.reference_run(STEPS, BATCH, lr=1e-2, weight_decay=0.01, clip=0.0, dtype=dtype, device=DEVICE,
                                loss_scale=2.0 ** 12 if precision == "fp16" else 1.0)
    torch_drift, zeal_drift = max_rel_diff(same, fp32), max_rel_diff(result["params"], fp32)
    assert zeal_drift <= 1.5 * torch_drift, f"zeal {precision} drift {zeal_drift:.3e} > 1.5 x torch's {torch_drift:.3e}"


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_fp16_overflow_on_device_follows_deepspeeds_loss_scale(tmp_path, stage):
    # The inf reaches the device check kernel through the gradients themselves (one rank, so no
    # all-reduce spreads it): the same skipped steps and scale trajectory as on the CPU.
    out = tmp_path / "trajectory.json"
    run_mpi(1, "fp16_overflow.py", "--out", out, "--stage", stage, "--inject_rank", 0, "--device", DEVICE)
    got = [(t["scale"], t["skipped"], t["changed"]) for t in json.loads(out.read_text())]
    # (hysteresis only under ZeRO: DeepSpeed's stage-0 fp16 optimizer halves at every overflow)
    assert got == expected_trajectory({3, 4, 5, 9}, 12, 256.0, 3, 2 if stage > 0 else 1)


def test_hf_activation_checkpointing_offloaded_to_host_matches_torch():
    # transformers' activation_checkpointing_enable(offload=True) on a device Llama: the checkpointed
    # hidden states go to pinned host memory (counted) and come back for the recomputation; the
    # engine's run at ZeRO 0 and 3 equals plain torch without checkpointing (ranks/hf_offload.py).
    pytest.importorskip("transformers")
    proc = run_mpi(1, "hf_offload.py", "--device", DEVICE, "--stages", "0,3")
    assert "HF-OFFLOAD-OK" in proc.stdout, proc.stdout + proc.stderr
