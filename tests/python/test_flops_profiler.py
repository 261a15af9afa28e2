"""DeepSpeed's FLOPs profiler (zeal.profiling.flops_profiler): the multiply-accumulate part of its
count equals torch's FlopCounterMode on a small GPT-like model, module by module; the other ops
follow DeepSpeed's rules; get_model_profile's numbers; the printout's labels; and torch's own
functions are back after end_profile, also when the profiled forward raises."""
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from zeal.profiling import flops_profiler as fp

VOCAB, DIM, HEADS, SEQ, BATCH = 11, 8, 2, 5, 2


class Attention(nn.Module):
    def __init__(self, fused):
        super().__init__()
        self.fused = fused
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, HEADS, d // HEADS).permute(2, 0, 3, 1, 4)
        if self.fused:
            # FlopCounterMode has no rule for the CPU flash kernel; the math one runs bmm
            with sdpa_kernel(SDPBackend.MATH):
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = (q @ k.transpose(-2, -1)) * (d // HEADS) ** -0.5
            flat_q, flat_k = q.reshape(b * HEADS, t, -1), k.reshape(b * HEADS, t, -1)
            extra = torch.baddbmm(torch.zeros(b * HEADS, t, t), flat_q, flat_k.transpose(1, 2))
            scores = scores + extra.view(scores.shape)
            attn = F.softmax(scores, dim=-1)
            y = torch.matmul(attn, v)
            y = y + torch.bmm(attn.reshape(b * HEADS, t, t), v.reshape(b * HEADS, t, -1)).view(y.shape)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, fused):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.attn = Attention(fused)
        self.conv = nn.Conv1d(DIM, DIM, 3, padding=1, groups=2)
        self.mlp = nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        x = x + self.conv(x.transpose(1, 2)).transpose(1, 2)
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok, self.pos = nn.Embedding(VOCAB, DIM), nn.Embedding(SEQ, DIM)
        self.blocks = nn.ModuleList([Block(fused=False), Block(fused=True)])
        self.ln = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def tokens():
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))


def profiled(model, *args, ignore_list=None):
    """(profiler still started, FlopCounterMode) after one forward seen by both."""
    prof = fp.FlopsProfiler(model)
    prof.start_profile(ignore_list=ignore_list)
    with FlopCounterMode(display=False) as counter:
        model(*args)
    return prof, counter


def counter_module_flops(counter, root, name):
    return sum(counter.get_flop_counts().get(root + ("." + name if name else ""), {}).values())


def torch_functions():
    return {(owner.__name__, name): getattr(owner, name)
            for owner in (F, torch, torch.Tensor)
            for name in ("linear", "conv1d", "embedding", "layer_norm", "softmax", "gelu",
                         "scaled_dot_product_attention", "matmul", "__matmul__", "mm", "bmm", "addmm", "baddbmm", "mul", "add", "einsum")
            if hasattr(owner, name)}


def test_multiply_accumulate_flops_equal_flop_counter_mode():
    model = TinyGPT()
    prof, counter = profiled(model, tokens())
    try:
        by_op = prof.get_flops_by_op()
        assert prof.get_total_matmul_flops() == counter.get_total_flops() > 0

        # module by module: every module that ran, its subtree
        for name, module in model.named_modules():
            if module.__duration__ == 0:  # never called itself (the ModuleList)
                continue
            expect = counter_module_flops(counter, "TinyGPT", name)
            assert 2 * fp.get_module_macs(module) == expect, name
            if isinstance(module, (nn.Linear, nn.Embedding)):  # DeepSpeed's total: no bias term either
                assert fp.get_module_flops(module) == expect, name

        # linear + attention matmuls + conv + embedding, op by op
        global_counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
        plain = ["torch.nn.functional.linear", "torch.Tensor.__matmul__", "torch.matmul", "torch.bmm",
                 "torch.nn.functional.scaled_dot_product_attention", "torch.nn.functional.embedding"]
        for op in plain:
            assert op in by_op, op
            assert by_op[op][0] == 2 * by_op[op][1], op
        assert by_op["torch.nn.functional.embedding"] == (0, 0)
        conv_macs, baddbmm_macs = by_op["torch.nn.functional.conv1d"][1], by_op["torch.baddbmm"][1]
        assert 2 * conv_macs == global_counts["aten.convolution"]
        assert 2 * baddbmm_macs == global_counts["aten.baddbmm"]
        assert sum(by_op[op][0] for op in plain) + 2 * conv_macs + 2 * baddbmm_macs == counter.get_total_flops()

        # the rest as DeepSpeed counts it
        activations = BATCH * SEQ * DIM
        assert by_op["torch.nn.functional.layer_norm"] == (5 * 5 * activations, 0)
        assert by_op["torch.nn.functional.gelu"] == (2 * 4 * activations, 0)
        assert by_op["torch.nn.functional.softmax"] == (BATCH * HEADS * SEQ * SEQ, 0)
        assert by_op["torch.nn.functional.conv1d"][0] == 2 * conv_macs + 2 * activations  # + bias per output
        assert by_op["torch.baddbmm"][0] == 2 * baddbmm_macs + BATCH * HEADS * SEQ * SEQ  # + the added input
        assert prof.get_total_flops() == sum(flops for flops, _ in by_op.values())
        assert prof.get_total_params() == sum(p.numel() for p in model.parameters())
    finally:
        prof.end_profile()


def test_ignored_module_types_are_credited_to_their_parent():
    model = TinyGPT()
    prof, counter = profiled(model, tokens(), ignore_list=[nn.Linear])
    try:
        assert prof.get_total_matmul_flops() == counter.get_total_flops()
        assert model.head.__flops__ == 0
        assert model.__flops__ > 0  # head's linear ran in TinyGPT's own forward
    finally:
        prof.end_profile()


def test_get_model_profile_of_linear_layers():
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 4, bias=False))
    flops, macs, params = fp.get_model_profile(model, input_shape=(3, 6), print_profile=False, as_string=False)
    assert params == sum(p.numel() for p in model.parameters()) == 6 * 8 + 8 + 8 * 4
    assert macs == 3 * 6 * 8 + 3 * 8 * 4
    assert flops == 2 * macs
    assert not model.training  # get_model_profile leaves the model in eval mode, as DeepSpeed's

    as_strings = fp.get_model_profile(model, args=[torch.ones(3, 6)], print_profile=False)
    assert as_strings == (fp.number_to_string(flops), fp.macs_to_string(macs), fp.params_to_string(params))
    assert as_strings == ("480 ", "240 MACs", "88")


def test_number_formatting_is_deepspeeds():
    assert fp.number_to_string(12) == "12 "
    assert fp.number_to_string(0) == "0 "
    assert fp.macs_to_string(1.05e6) == "1.05 MMACs"
    assert fp.flops_to_string(3.2e9) == "3.2 GFLOPS"
    assert fp.duration_to_string(0.01234) == "12.34 ms"
    assert fp.duration_to_string(1.5) == "1.5 s"
    assert fp.bytes_to_string(2048) == "2.05 KB"
    assert fp.params_to_string(7.1e9) == "7.1 B"
    assert fp.params_to_string(1050) == "1.05 K"
    assert fp.params_to_string(12) == "12"
    assert fp.params_to_string(3e9, units="B") == "3 B"


class FakeEngine:
    world_size, dp_world_size, mp_world_size = 4, 4, 1

    def train_micro_batch_size_per_gpu(self):
        return 2

    def wall_clock_breakdown(self):
        return True


def test_printout_has_deepspeeds_labels(capsys, tmp_path):
    model = TinyGPT()
    prof = fp.FlopsProfiler(model, ds_engine=FakeEngine())
    prof.start_profile()
    model(tokens())
    plain_repr = None
    try:
        prof.print_model_profile(profile_step=3, top_modules=2, fwd_latency=0.5, bwd_latency=1.0, step_latency=0.5)
        printed = capsys.readouterr().out
        output_file = tmp_path / "profiles" / "flops.txt"
        prof.print_model_profile(profile_step=3, top_modules=2, detailed=False, output_file=str(output_file))
        assert "DeepSpeed Flops Profiler" not in capsys.readouterr().out
        written = output_file.read_text()
        total_params = prof.get_total_params()
    finally:
        prof.end_profile()
        plain_repr = repr(model)

    line = "{:<70}  {:<8}".format
    for text in [
        "\n-------------------------- DeepSpeed Flops Profiler --------------------------\n",
        "Profile Summary at step 3:\n",
        "Notations:\ndata parallel size (dp_size), model parallel size(mp_size),\n",
        line("world size: ", 4), line("data parallel size: ", 4), line("model parallel size: ", 1),
        line("batch size per GPU: ", 2),
        line("params per GPU: ", fp.params_to_string(total_params)),
        line("params of model = params per GPU * mp_size: ", fp.params_to_string(total_params)),
        "fwd MACs per GPU: ", "fwd flops per GPU: ", "fwd flops of model = fwd flops per GPU * mp_size: ",
        line("fwd latency: ", "500 ms"),
        "fwd FLOPS per GPU = fwd flops per GPU / fwd latency: ",
        line("bwd latency: ", "1 s"),
        "bwd FLOPS per GPU = 2 * fwd flops per GPU / bwd latency: ",
        "fwd+bwd FLOPS per GPU = 3 * fwd flops per GPU / (fwd+bwd latency): ",
        line("step latency: ", "500 ms"), line("iter latency: ", "2 s"),
        "FLOPS per GPU = 3 * fwd flops per GPU / iter latency: ",
        line("samples/second: ", 4.0),  # 2 per GPU x 4 GPUs / 2 s
        "\n----------------------------- Aggregated Profile per GPU -----------------------------\n",
        "Top 2 modules in terms of params, MACs or fwd latency at different model depths:\n",
        f"depth 0:\n    params      - {{'TinyGPT': '{fp.params_to_string(total_params)}'}}\n",
        "    MACs        - {'ModuleList': ",
        "    fwd latency - {",
        "\n------------------------------ Detailed Profile per GPU ------------------------------\n",
        "Each module profile is listed after its name in the following order: \nparams, percentage of total params, "
        "MACs, percentage of total MACs, fwd latency, percentage of total fwd latency, fwd FLOPS\n",
        "= 100% Params, ",
        "(head): Linear(88 = ",
        "% latency, ",
        "FLOPS, in_features=8, out_features=11, bias=False)",
        "\n------------------------------------------------------------------------------\n",
    ]:
        assert text in printed, text
    assert "depth 4:" in printed  # module_depth=-1 reaches the innermost modules

    assert "Profile Summary at step 3:" in written and "Aggregated Profile per GPU" in written
    assert "Detailed Profile per GPU" not in written and "\nbwd latency: " not in written
    assert "% Params" not in plain_repr  # extra_repr is the module's own again


def test_print_does_nothing_unless_started(capsys, tmp_path):
    prof = fp.FlopsProfiler(nn.Linear(2, 2))
    prof.print_model_profile(output_file=str(tmp_path / "none.txt"))
    assert capsys.readouterr().out == "" and not (tmp_path / "none.txt").exists()


class Fails(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 3)

    def forward(self, x):
        self.linear(x)
        raise RuntimeError("forward failed")


def assert_unpatched(before, model):
    assert torch_functions() == before
    assert not any(name in vars(torch.Tensor) for name in ("matmul", "__matmul__", "mm", "bmm", "add", "mul"))
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert not any(attr in vars(module) for attr in ("__flops__", "__macs__", "__params__", "__duration__"))


def test_torch_functions_are_restored():
    before = torch_functions()
    model = TinyGPT()
    prof = fp.FlopsProfiler(model)
    prof.start_profile()
    assert F.linear is not before[("torch.nn.functional", "linear")]
    assert torch.Tensor.__matmul__ is not before[("Tensor", "__matmul__")]
    model(tokens())
    prof.stop_profile()
    assert torch_functions() == before and prof.get_total_flops() > 0  # counters outlive stop_profile
    prof.end_profile()
    assert_unpatched(before, model)

    model = Fails()
    prof = fp.FlopsProfiler(model)
    prof.start_profile()
    try:
        with pytest.raises(RuntimeError, match="forward failed"):
            model(torch.ones(2, 3))
        assert prof.get_total_flops() == 2 * 2 * 3 * 3  # the linear that ran before the failure
    finally:
        prof.end_profile()
    assert_unpatched(before, model)

    with pytest.raises(RuntimeError, match="forward failed"):
        fp.get_model_profile(model, input_shape=(2, 3), warm_up=0)
    assert_unpatched(before, model)


def _demo_gpt():
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "python"))
    from gpt import GPT

    torch.manual_seed(0)
    return GPT(vocab=40, block=16, width=32, layers=2, heads=4)


def test_the_demo_gpt_counts_as_flop_counter_mode():
    """examples/python/gpt.py's model: the profiler's Linear + attention matmul + embedding FLOPs
    equal FlopCounterMode's total for the same forward."""
    model = _demo_gpt()
    x = torch.randint(0, 40, (2, 16))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x)
    prof = fp.FlopsProfiler(model)
    prof.start_profile()
    with sdpa_kernel(SDPBackend.MATH):
        model(x)
    prof.stop_profile()
    assert prof.get_total_matmul_flops() == counter.get_total_flops() > 0
    prof.end_profile()


def test_the_engine_prints_the_profile_at_profile_step(tmp_path):
    """The config's flops_profiler section: the engine profiles the first forward of step
    profile_step and writes DeepSpeed's report to output_file, once."""
    import zeal

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20), nn.Linear(20, 3))
    out = tmp_path / "profile.txt"
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
              "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
              "flops_profiler": {"enabled": True, "profile_step": 2, "module_depth": -1, "top_modules": 1,
                                 "detailed": True, "output_file": str(out)}}
    engine, _, _, _ = zeal.initialize(model=model, model_parameters=model.parameters(), config=config)
    for step in range(4):
        for _ in range(2):
            loss = engine(torch.randn(4, 12)).square().mean()
            engine.backward(loss)
            engine.step()
        assert out.exists() == (step >= 2), step
    text = out.read_text()
    macs = 4 * (12 * 20 + 20 * 3)
    assert "Profile Summary at step 2" in text and "fwd MACs per GPU:" in text, text
    lines = {l.split(":")[0]: l.split(":", 1)[1].strip() for l in text.splitlines() if ":" in l}
    assert lines["fwd MACs per GPU"] == fp.macs_to_string(macs), text
    assert lines["fwd flops per GPU"] == fp.number_to_string(2 * macs).strip(), text
    assert lines["params per GPU"] == "323", text
    assert engine.flops_profiler is not None and not fp._saved  # torch's functions are back
