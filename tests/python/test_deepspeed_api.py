"""DeepSpeed's public API as scripts call it, with `import zeal as deepspeed` (one process; the
multi-rank behaviour is in test_client_optimizer.py and test_deepspeed_examples.py)."""
import argparse
import math

import pytest
import torch

import zeal as deepspeed

CFG = {"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "AdamW", "params": {"lr": 0.01}},
       "steps_per_print": 1000}


def mlp(tie=False):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.ReLU(), torch.nn.Linear(6, 6))
    if tie:
        model[2].weight = model[0].weight
    return model


def test_module_level_names():
    for name in ("initialize", "add_config_arguments", "init_distributed", "comm", "accelerator", "utils", "pipe",
                 "zero", "checkpoint", "PipelineModule", "LayerSpec", "TiedLayerSpec", "get_accelerator",
                 "DeepSpeedEngine", "PipelineEngine", "DeepSpeedConfigError", "RepeatingLoader"):
        assert hasattr(deepspeed, name), name
    assert deepspeed.__version__.count(".") == 2 and isinstance(deepspeed.__version_major__, int)
    assert isinstance(deepspeed.__git_hash__, str) and deepspeed.__git_hash__
    assert isinstance(deepspeed.__git_branch__, str)
    assert deepspeed.pipe.PipelineModule is deepspeed.PipelineModule


def test_add_config_arguments_and_args_config(tmp_path):
    parser = deepspeed.add_config_arguments(argparse.ArgumentParser())
    path = tmp_path / "ds.json"
    path.write_text('{"train_batch_size": 8, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}')
    args = parser.parse_args(["--deepspeed", "--deepspeed_config", str(path)])
    assert args.deepspeed is True
    engine, *_ = deepspeed.initialize(args=args, model=mlp(), model_parameters=mlp().parameters())
    assert engine.train_batch_size() == 8


def test_engine_properties_and_queries():
    cfg = dict(CFG, gradient_clipping=1.0, zero_optimization={"stage": 2})
    engine, optimizer, _, _ = deepspeed.initialize(model=mlp(), config=cfg)
    assert engine.optimizer is optimizer and isinstance(optimizer, torch.optim.Optimizer)
    assert engine.device == torch.device("cpu") and engine.local_rank == 0
    assert engine.global_rank == 0 and engine.world_size == 1 and engine.dp_world_size == 1
    assert not engine.fp16_enabled() and not engine.bfloat16_enabled()
    assert engine.zero_optimization() and engine.zero_optimization_stage() == 2
    assert engine.gradient_clipping() == 1.0 and engine.optimizer_name() == "adamw"
    assert engine.get_batch_info() == (4, 4, 1)
    assert engine.communication_data_type == torch.float32
    assert engine.get_global_grad_norm() is None  # before the first step
    assert engine.was_step_applied() is False
    # An attribute the engine lacks comes from the module, as DeepSpeed's __getattr__.
    engine.module.vocab_note = "from the module"
    assert engine.vocab_note == "from the module"
    with pytest.raises(AttributeError):
        engine.no_such_attribute


def test_backward_returns_and_options():
    engine, *_ = deepspeed.initialize(model=mlp(), config=dict(CFG, gradient_accumulation_steps=2, gradient_clipping=5.0))
    x = torch.randn(4, 6)
    loss = engine(x).pow(2).mean()
    out = engine.backward(loss, retain_graph=True)
    assert torch.allclose(out, loss / 2)  # DeepSpeed returns the loss divided by the accumulation steps
    grads_once = [p.grad.clone() for p in engine.module.parameters()]
    engine.step()  # micro step 1 of 2: counts only
    assert not engine.was_step_applied()
    engine.backward(loss, scale_wrt_gas=False)  # the retained graph again, not divided by 2
    for g1, p in zip(grads_once, engine.module.parameters()):
        assert torch.allclose(p.grad, 3 * g1, atol=1e-6)
    engine.step()
    assert engine.was_step_applied() is True
    norm = engine.get_global_grad_norm()
    assert norm is not None and norm > 0 and math.isfinite(norm)


def test_set_gradient_accumulation_boundary_overrides_the_count():
    engine, *_ = deepspeed.initialize(model=mlp(), config=dict(CFG, gradient_accumulation_steps=4))
    engine.set_gradient_accumulation_boundary(True)
    assert engine.is_gradient_accumulation_boundary()
    engine.backward(engine(torch.randn(4, 6)).pow(2).mean())
    engine.step()
    assert engine.global_steps == 1 and engine.was_step_applied()
    engine.set_gradient_accumulation_boundary(False)
    engine.backward(engine(torch.randn(4, 6)).pow(2).mean())
    engine.step()
    assert engine.global_steps == 1 and not engine.was_step_applied()


def test_onecycle_momentum_and_scheduler_view():
    cfg = dict(CFG, scheduler={"type": "OneCycle", "params": {"cycle_min_lr": 0.001, "cycle_max_lr": 0.01,
                                                             "cycle_first_step_size": 4, "cycle_min_mom": 0.85,
                                                             "cycle_max_mom": 0.95}})
    engine, optimizer, _, scheduler = deepspeed.initialize(model=mlp(), config=cfg)
    moms = []
    for _ in range(3):
        engine.backward(engine(torch.randn(4, 6)).pow(2).mean())
        engine.step()
        moms.append(scheduler.get_mom()[0])
        assert optimizer.param_groups[0]["betas"] == moms[-1]
    # DeepSpeed's OneCycle: betas (momentum, 0.99), the momentum cycling down while the lr rises.
    assert all(m[1] == 0.99 for m in moms)
    assert moms[0][0] > moms[1][0] > moms[2][0] >= 0.85
    assert scheduler.get_lr() == engine.get_lr() == [g["lr"] for g in optimizer.param_groups]
    assert scheduler.state_dict() == {"last_batch_iteration": 2}


def test_fp16_optimizer_surface():
    cfg = dict(CFG, fp16={"enabled": True, "initial_scale_power": 8})
    engine, optimizer, *_ = deepspeed.initialize(model=mlp(), config=cfg)
    assert engine.fp16_enabled() and optimizer.loss_scale == 256 and optimizer.cur_scale == 256
    lsc = optimizer.loss_scale_config
    assert lsc.dynamic_loss_scale and lsc.cur_scale == 256 and lsc.use_grad_scaling
    engine.backward(engine(torch.randn(4, 6).half()).float().pow(2).mean())
    engine.step()
    assert optimizer.overflow is False


def test_comm_accelerator_utils():
    comm = deepspeed.comm
    deepspeed.init_distributed()
    assert comm.is_initialized() and comm.get_rank() == 0 and comm.get_world_size() == 1
    t = torch.ones(3)
    comm.all_reduce(t)
    assert torch.equal(t, torch.ones(3))
    comm.all_reduce(t, op=comm.ReduceOp.MAX)
    comm.barrier()
    with pytest.raises(deepspeed.CommError, match="SUM, AVG, MIN or MAX"):
        comm.all_reduce(t, op=comm.ReduceOp.BXOR)
    acc = deepspeed.get_accelerator()
    assert acc.device_name() == "cpu" and acc.current_device_name() == "cpu"
    assert acc.is_bf16_supported() and acc.is_available() and acc.communication_backend_name() == "mpi"
    assert deepspeed.accelerator.get_accelerator() is acc
    loader = deepspeed.utils.RepeatingLoader([1, 2])
    assert [next(loader) for _ in range(5)] == [1, 2, 1, 2, 1]
    deepspeed.utils.set_random_seed(7)
    a = torch.rand(2)
    deepspeed.utils.set_random_seed(7)
    assert torch.equal(a, torch.rand(2))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_safe_get_set_full_values_single_rank(stage):
    model = mlp()
    engine, *_ = deepspeed.initialize(model=model, config=dict(CFG, zero_optimization={"stage": stage}))
    p = list(model.parameters())[0]
    want = deepspeed.utils.safe_get_full_fp32_param(p)
    assert want.shape == (6, 6)
    deepspeed.utils.safe_set_full_fp32_param(p, torch.full((6, 6), 0.5))
    assert torch.equal(deepspeed.utils.safe_get_full_fp32_param(p), torch.full((6, 6), 0.5))
    with deepspeed.zero.GatheredParameters([p]) if stage == 3 else _nothing():
        assert torch.equal(p.detach().float(), torch.full((6, 6), 0.5))  # the model's parameter follows
    engine.backward(engine(torch.randn(4, 6)).pow(2).mean())
    assert deepspeed.utils.safe_get_full_grad(p).shape == (6, 6)
    engine.step()
    assert deepspeed.utils.safe_get_full_optimizer_state(p, "exp_avg").abs().sum() > 0
    with pytest.raises(deepspeed.Error, match="no state 'momentum'"):
        deepspeed.utils.safe_get_full_optimizer_state(p, "momentum")
    engine.empty_partition_cache()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_fp16_auto_cast_casts_inputs():
    cfg = dict(CFG, fp16={"enabled": True, "auto_cast": True})
    engine, *_ = deepspeed.initialize(model=mlp(), config=cfg)
    out = engine(torch.randn(4, 6))  # fp32 input, fp16 model: cast by the engine
    assert out.dtype == torch.float16


def test_tied_weights_keep_both_names_in_the_fp32_export(tmp_path):
    model = mlp(tie=True)
    engine, *_ = deepspeed.initialize(model=model, config=dict(CFG))
    engine.backward(engine(torch.randn(4, 6)).pow(2).mean())
    engine.step()
    engine.save_checkpoint(tmp_path)
    state = deepspeed.checkpoint.to_fp32_state_dict(tmp_path)
    assert set(state) == set(model.state_dict())
    fresh = mlp(tie=True)
    fresh.load_state_dict(state, strict=True)
    assert torch.equal(fresh[2].weight, model[0].weight.detach()) and fresh[2].weight is fresh[0].weight
    out = tmp_path / "model.safetensors"
    deepspeed.checkpoint.to_fp32_file(tmp_path, out)
    assert set(deepspeed._zeal.read_safetensors(str(out))) == set(model.state_dict())


def test_config_queries_report_deepspeed_values():
    cfg = dict(CFG, zero_optimization={"stage": 3, "stage3_prefetch_bucket_size": 1234, "reduce_scatter": False,
                                       "stage3_gather_16bit_weights_on_model_save": True},
               fp16={"enabled": True, "initial_scale_power": 10, "loss_scale_window": 50})
    engine, *_ = deepspeed.initialize(model=mlp(), config=cfg)
    assert engine.zero_prefetch_bucket_size() == 1234 and engine.zero_reduce_scatter() is False
    assert engine.zero_max_live_parameters() == 1000000000 and engine.zero_quantized_weights() is False
    assert engine.zero_gather_16bit_weights_on_model_save() is True and engine.pld_enabled() is False
    assert engine.initial_dynamic_scale() == 1024
    assert engine.dynamic_loss_scale_args() == {"init_scale": 1024, "scale_window": 50, "delayed_shift": 2,
                                                "consecutive_hysteresis": False, "min_scale": 1}
    assert engine.postscale_gradients() and not engine.zero_use_cpu_optimizer() and engine.mp_world_size == 1
    x = torch.randn(4, 6).half()
    assert torch.allclose(engine.scale(engine(x).float().sum()), engine(x).float().sum() * 1024)


@pytest.mark.parametrize("stage", [0, 3])
def test_save_16bit_model(tmp_path, stage):
    zero = {"stage": stage, "stage3_gather_16bit_weights_on_model_save": True}
    model = mlp(tie=True)
    engine, *_ = deepspeed.initialize(model=model, config=dict(CFG, bf16={"enabled": True}, zero_optimization=zero))
    assert engine.save_16bit_model(tmp_path) is True
    state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    assert set(state) == set(model.state_dict()) and all(v.dtype == torch.bfloat16 for v in state.values())
    assert state["0.weight"].shape == (6, 6)
    torch.manual_seed(0)
    want = torch.nn.Linear(6, 6).weight.to(torch.bfloat16)
    assert torch.equal(state["0.weight"], want)
    engine2, *_ = deepspeed.initialize(model=mlp(), config=dict(CFG, zero_optimization={"stage": 3}))
    with pytest.warns(UserWarning, match="not saved"):
        assert engine2.save_16bit_model(tmp_path / "no") is False


def test_no_sync_accumulates_without_reducing_then_reduces():
    engine, *_ = deepspeed.initialize(model=mlp(), config=dict(CFG))
    x = torch.randn(4, 6)
    with engine.no_sync():
        assert not engine.is_gradient_accumulation_boundary()
        engine.backward(engine(x).pow(2).mean())
    assert engine.is_gradient_accumulation_boundary()
    engine.backward(engine(x).pow(2).mean())
    engine.step()
    assert engine.global_steps == 1 and engine.was_step_applied()
    engine3, *_ = deepspeed.initialize(model=mlp(), config=dict(CFG, zero_optimization={"stage": 2}))
    with pytest.raises(RuntimeError, match="ZeRO stage 0 or 1"):
        engine3.no_sync()
