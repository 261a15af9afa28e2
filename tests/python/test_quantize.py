"""ZeRO++'s block quantization through the bindings (zeal/comm/quantized.h): the round trip is
within half a step of every block, error feedback is carried and updated in place, bad arguments
are refused naming what was given, and (with a GPU) the CUDA kernels give bitwise the CPU's bytes,
scales and errors at every size and block boundary. The float64 reference checks of the kernels
themselves are in tests/cpp/test_kernels.cpp (Quantize.*)."""
import pytest
import torch

import zeal
from zeal import _zeal

SIZES = [1, 7, 8, 9, 4099]
BLOCKS = [2, 64, 2048]


def levels(q, bits, n):
    if bits == 8:
        return q.view(torch.int8).to(torch.int32)[:n]
    nib = torch.stack([q & 0xF, q >> 4], dim=1).flatten().to(torch.int32)[:n]
    return torch.where(nib >= 8, nib - 16, nib)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("block", BLOCKS)
def test_round_trip_is_within_half_a_step_of_each_block(bits, n, block):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n + block)) * 3
    q, scales = _zeal.quantize_blocks(x, bits, block)
    assert q.dtype == torch.uint8 and q.numel() == (n if bits == 8 else (n + 1) // 2)
    assert scales.numel() == -(-n // block)
    qmax = 127 if bits == 8 else 7
    blocks = x.split(block)
    want = torch.stack([b.abs().max() for b in blocks]).double() / qmax
    assert torch.allclose(scales.double(), want, rtol=1e-6)
    step = scales.repeat_interleave(block)[:n]
    back = _zeal.dequantize_blocks(q, scales, n, bits, block)
    assert ((back - x).abs() <= step / 2 * (1 + 1e-5)).all()
    assert (levels(q, bits, n).abs() <= qmax).all()
    assert _zeal.quantized_wire_bytes(n, bits, block) == -(-q.numel() // 4) * 4 + 4 * scales.numel()


def test_error_feedback_is_updated_in_place_and_carries_the_loss():
    x = torch.tensor([100.0, 0.3, 0.3, 0.3] * 4)
    err = torch.zeros_like(x)
    total = torch.zeros_like(x)
    for _ in range(100):
        q, s = _zeal.quantize_blocks(x, 4, 4, err)
        _zeal.dequantize_blocks(q, s, x.numel(), 4, 4, total)
    assert torch.allclose(total, 100 * x, atol=100 / 7)  # without feedback the 0.3s would sum to 0
    assert (err.abs() <= 100 / 7 / 2 + 1e-4).all()


def test_bad_arguments_are_refused_by_name():
    x = torch.randn(10)
    with pytest.raises(zeal.Error, match="bits must be 8 or 4, got 2"):
        _zeal.quantize_blocks(x, 2, 8)
    with pytest.raises(zeal.Error, match="positive even number of elements, got 3"):
        _zeal.quantize_blocks(x, 4, 3)
    with pytest.raises(zeal.Error, match="error buffer must be a contiguous fp32 tensor of 10 elements"):
        _zeal.quantize_blocks(x, 8, 4, torch.zeros(9))
    with pytest.raises(zeal.Error, match=r"error_beta must be in \[0, 1\), got 1"):
        _zeal.quantize_blocks(x, 8, 4, torch.zeros(10), error_beta=1.0)
    q, s = _zeal.quantize_blocks(x, 8, 4)
    with pytest.raises(zeal.Error, match="do not describe 11 elements"):
        _zeal.dequantize_blocks(q, s, 11, 8, 4)
    with pytest.raises(zeal.Error, match="floating-point tensor"):
        _zeal.quantize_blocks(torch.arange(4), 8, 4)


def test_half_precision_inputs_are_quantized_from_their_fp32_values():
    x = torch.randn(300, dtype=torch.bfloat16)
    q16, s16 = _zeal.quantize_blocks(x, 8, 64)
    q32, s32 = _zeal.quantize_blocks(x.float(), 8, 64)
    assert torch.equal(q16, q32) and torch.equal(s16, s32)


@pytest.mark.skipif(not (_zeal.with_cuda and torch.cuda.is_available()),
                    reason=f"needs a GPU and a CUDA build (zeal with_cuda={_zeal.with_cuda}, "
                           f"torch.cuda.is_available()={torch.cuda.is_available()})")
@pytest.mark.parametrize("bits", [8, 4])
def test_cuda_kernels_equal_the_cpu_kernels_bit_for_bit(bits):
    for n in SIZES + [1 << 20]:
        for block in BLOCKS:
            g = torch.Generator().manual_seed(n * 7 + block)
            x = torch.randn(n, generator=g) * 5
            x[n // 2] = 0.0
            for beta in (0.0, 0.8):  # plain error feedback, LoCo's moving average
                err = torch.randn(n, generator=g) * 0.01
                err_gpu = err.cuda()
                q, s = _zeal.quantize_blocks(x, bits, block, err, error_beta=beta)
                qg, sg = _zeal.quantize_blocks(x.cuda(), bits, block, err_gpu, error_beta=beta)
                what = f"{n} elements, blocks of {block}, {bits} bits, error_beta {beta}"
                assert torch.equal(q, qg.cpu()), what
                assert torch.equal(s, sg.cpu()), what
                assert torch.equal(err, err_gpu.cpu()), what
            out = torch.ones(n)
            out_gpu = out.cuda()
            _zeal.dequantize_blocks(q, s, n, bits, block, out)
            _zeal.dequantize_blocks(qg, sg, n, bits, block, out_gpu)
            assert torch.equal(out, out_gpu.cpu()), what
    bad = torch.tensor([1.0, float("nan"), 2.0, 3.0], device="cuda")
    q, s = _zeal.quantize_blocks(bad, bits, 2)
    assert s.cpu()[0].isnan() and s.cpu()[1] == 3.0 / (127 if bits == 8 else 7)


@pytest.mark.parametrize("zero,words", [
    ({"stage": 3, "zero_quantized_weights": True}, None),
    ({"stage": 2, "zero_quantized_weights": True},
     ["zero_optimization.zero_quantized_weights", "need ZeRO stage 3", "stage is 2"]),
    ({"stage": 3, "zero_quantized_weights": "yes"}, ["zero_optimization.zero_quantized_weights", "boolean"]),
    ({"stage": 1, "zero_quantized_gradients": True}, ["zero_optimization.zero_quantized_gradients", "need ZeRO stage 3"]),
    ({"stage": 2, "zeropp_loco_param": {"err_beta": 0.8}}, ["zero_optimization.zeropp_loco_param", "needs ZeRO stage 3"]),
    ({"stage": 3, "zeropp_loco_param": {"err_beta": 1.0}}, ["zero_optimization.zeropp_loco_param.err_beta", "[0, 1)"]),
    ({"stage": 3, "zeropp_loco_param": {"reset_T": 0}}, ["zero_optimization.zeropp_loco_param.reset_T"]),
    ({"stage": 3, "zeropp_loco_param": {"err_beta": 0.8, "reset": 5}}, ["zero_optimization.zeropp_loco_param.reset"]),
    ({"stage": 2, "zero_hpz_partition_size": 2}, ["zero_optimization.zero_hpz_partition_size", "needs ZeRO stage 3"]),
    ({"stage": 3, "zero_hpz_partition_size": 0}, ["zero_optimization.zero_hpz_partition_size"]),
    ({"stage": 3, "zero_hpz_partition_size": 2, "offload_param": {"device": "nvme", "nvme_path": "/tmp"}},
     ["zero_optimization.zero_hpz_partition_size", "offload_param.device", "nvme"]),
    ({"stage": 3, "zero_quantized_nontrainable_weights": True}, "quantized_nontrainable_weights"),
    ({"stage": 2, "zero_quantized_nontrainable_weights": True},
     ["zero_optimization.zero_quantized_nontrainable_weights", "need ZeRO stage 3", "stage is 2"]),
    ({"stage": 3, "zero_quantized_nontrainable_weights": True, "offload_param": {"device": "nvme", "nvme_path": "/tmp"}},
     ["zero_optimization.zero_quantized_nontrainable_weights", "nvme"]),
    ({"stage": 2, "mics_shard_size": 2}, ["zero_optimization.mics_shard_size", "needs ZeRO stage 3"]),
    ({"stage": 3, "mics_shard_size": 0}, ["zero_optimization.mics_shard_size", "-1 (off) or a positive", "got 0"]),
    ({"stage": 3, "mics_shard_size": 2, "zero_hpz_partition_size": 2},
     ["zero_optimization.mics_shard_size", "zero_optimization.zero_hpz_partition_size", "set one of them"]),
])
def test_zeropp_config_keys(zero, words):
    import json

    from zeal.config import to_json

    cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero}
    if words is None or isinstance(words, str):  # accepted: the field it sets
        parsed = _zeal.validate_config(to_json(cfg))
        assert getattr(parsed.zero_optimization, words or "quantized_weights") is True
        return
    with pytest.raises(zeal.ConfigError) as e:
        _zeal.validate_config(to_json(json.loads(json.dumps(cfg))))
    for w in words:
        assert w in str(e.value)


def test_loco_keys_parse_with_deepspeeds_defaults():
    from zeal.config import to_json

    def loco(value):
        cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3, "zero_quantized_gradients": True}}
        if value is not ...:
            cfg["zero_optimization"]["zeropp_loco_param"] = value
        return _zeal.validate_config(to_json(cfg)).zero_optimization.loco

    assert loco(...) is None and loco(None) is None
    assert loco({}) == {"err_beta": 0.8, "reset_T": 1024}
    assert loco({"err_beta": 0.5, "reset_T": 7}) == {"err_beta": 0.5, "reset_T": 7}


def test_mics_that_does_not_divide_the_ranks_is_refused_naming_the_key():
    model = torch.nn.Linear(4, 4)
    cfg = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
           "zero_optimization": {"stage": 3, "mics_shard_size": 2, "mics_hierarchical_params_gather": True}}
    with pytest.raises(zeal.ConfigError, match="mics_shard_size': 2 must divide the data-parallel ranks"):
        zeal.initialize(model=model, config=cfg)


def test_hpz_that_does_not_divide_the_ranks_is_refused_naming_the_key():
    model = torch.nn.Linear(4, 4)
    cfg = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
           "zero_optimization": {"stage": 3, "zero_hpz_partition_size": 2}}
    with pytest.raises(zeal.ConfigError, match="zero_hpz_partition_size': 2 must divide the data-parallel ranks"):
        zeal.initialize(model=model, config=cfg)
