"""A table of bad configs: each is refused with a ConfigError (a ValueError) whose message names
the key path, what was expected and what was given."""
import pytest
import torch

import zeal

OK = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "Adam", "params": {"lr": 0.001}}}

BAD = [
    # (config overrides, fragments the message must hold)
    ({"train_batch_size": "16"}, ["'train_batch_size'", "integer >= 1", '"16"']),
    ({"train_batch_size": -4}, ["'train_batch_size'", ">= 1", "-4"]),
    ({"train_batch_size": 6, "gradient_accumulation_steps": 2}, ["train_batch_size (6)", "= 4"]),
    ({"train_micro_batch_size": 2}, ["unknown config key 'train_micro_batch_size'", "did you mean 'train_micro_batch_size_per_gpu'"]),
    ({"gradient_acumulation_steps": 2}, ["did you mean 'gradient_accumulation_steps'"]),
    ({"optimizer": {"type": "Adan"}}, ["'optimizer.type'", "did you mean 'Adam'"]),
    ({"optimizer": {"type": "Adam", "params": {"lr": "fast"}}}, ["'optimizer.params.lr'", "a number", '"fast"']),
    ({"optimizer": {"type": "Adam", "params": {"betas": [0.9, 1.5]}}}, ["'optimizer.params.betas'", "[0, 1)"]),
    ({"optimizer": {"type": "Adam", "params": {"eps": 0}}}, ["'optimizer.params.eps'", "> 0"]),
    ({"optimizer": {"type": "Lion"}}, ["'optimizer.type'", "not supported yet"]),
    ({"optimizer": {"type": "Lamb", "params": {"min_coeff": 2.0, "max_coeff": 1.0}}},
     ["'optimizer.params.max_coeff'", "min_coeff", "1.0"]),
    ({"optimizer": {"type": "Adagrad", "params": {"betas": [0.9, 0.99]}}}, ["'optimizer.params.betas'"]),
    ({"scheduler": {"type": "Cosine"}}, ["'scheduler.type'", "WarmupCosineLR"]),
    ({"scheduler": {"type": "OneCycle", "params": {"cycle_min_lr": 0.1}}}, ["'scheduler.params.cycle_max_lr'"]),
    ({"fp16": {"enabled": True, "loss_scale_window": 0}}, ["'fp16.loss_scale_window'", ">= 1"]),
    ({"fp16": {"enabled": True, "min_loss_scale": 0}}, ["'fp16.min_loss_scale'", "> 0"]),
    ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, ["fp16.enabled", "bf16.enabled"]),
    ({"bf16": {"enable": True}}, ["unknown config key 'bf16.enable'", "did you mean 'enabled'"]),
    ({"zero_optimization": {"stage": 3, "stage3_max_live_parameters": "lots"}},
     ["'zero_optimization.stage3_max_live_parameters'", "integer", '"lots"']),
    ({"zero_optimization": {"stage": 3, "stage3_prefetch_bucket": 5}},
     ["'zero_optimization.stage3_prefetch_bucket'", "did you mean 'stage3_prefetch_bucket_size'"]),
    ({"zero_optimization": {"stage": 0, "reduce_bucket_size": -1}}, ["'zero_optimization.reduce_bucket_size'", ">= 0"]),
    ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}},
     ["'zero_optimization.offload_param.device'", "needs ZeRO stage 3", "stage is 2"]),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}},
     ["'zero_optimization.offload_param.nvme_path'", "needs nvme_path"]),
    ({"comet": {"enabled": True}}, ["'comet.enabled'", "not supported yet"]),
    ({"tensorboard": {"enabled": True, "output_path": 7}}, ["'tensorboard.output_path'", "a string", "7"]),
    ({"sparse_attention": {"mode": "fixed"}}, ["'sparse_attention'", "not supported yet"]),
    ({"fp16": {"enabled": True, "fp16_master_weights_and_grads": True}},
     ["'fp16.fp16_master_weights_and_grads'", "got true"]),
    ({"zero_optimization": {"stage": 2, "cpu_offload": True, "offload_optimizer": {"device": "cpu"}}},
     ["'zero_optimization.cpu_offload'", "old name for offload_optimizer"]),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": None}}},
     ["'scheduler.params.warmup_num_steps'", "got null"]),
    ({"optimizer": {"type": "Adam", "params": {"max_grad_norm": 1.0}}},
     ["'optimizer.params.max_grad_norm'", "gradient_clipping"]),
    ({"train_batch_sise": 8}, ["'train_batch_sise'", "did you mean 'train_batch_size'"]),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "nvme"}}},
     ["'zero_optimization.offload_optimizer.nvme_path'", "needs nvme_path", "got nothing"]),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "nvme", "nvme_path": 5}}},
     ["'zero_optimization.offload_optimizer.nvme_path'", "directory path", "5"]),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "ssd"}}},
     ["'zero_optimization.offload_optimizer.device'", '"nvme"', '"ssd"']),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "nvme", "nvme_path": "/tmp",
                                                              "buffer_count": 2}}},
     ["'zero_optimization.offload_optimizer.buffer_count'", "at least 3", "got 2"]),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "nvme", "nvme_path": "/tmp"}},
      "optimizer": {"type": "Lamb", "params": {"lr": 0.001}}},
     ["'zero_optimization.offload_optimizer.device'", "Lamb", "per-tensor"]),
    ({"aio": {"block_size": 1000}}, ["'aio.block_size'", "multiple of 4096", "1000"]),
    ({"aio": {"queue_depth": 0}}, ["'aio.queue_depth'", ">= 1", "0"]),
    ({"aio": {"intra_op_parallelism": 100}}, ["'aio.intra_op_parallelism'", "[1, 64]", "100"]),
    ({"aio": {"use_gds": True}}, ["'aio.use_gds'", "GPUDirect", "true"]),
    ({"optimizer": {"type": "OneBitAdam", "params": {"freeze_step": 0}}}, ["'optimizer.params.freeze_step'", ">= 1"]),
    ({"optimizer": {"type": "onebitadam"}, "zero_optimization": {"stage": 2}},
     ["'zero_optimization.stage'", "OneBitAdam works with ZeRO stage 0 or 1, got 2"]),
    ({"optimizer": {"type": "ZeroOneAdam"}, "zero_optimization": {"stage": 1}},
     ["'zero_optimization.stage'", "ZeroOneAdam works with ZeRO stage 0 only, got 1", "local steps"]),
    ({"optimizer": {"type": "OneBitLamb"}, "zero_optimization": {"stage": 3}},
     ["'zero_optimization.stage'", "OneBitLamb works with ZeRO stage 0 or 1, got 3"]),
    ({"optimizer": {"type": "OneBitAdam"}, "zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}}},
     ["'zero_optimization.offload_optimizer'", "OneBitAdam cannot be offloaded"]),
    ({"optimizer": {"type": "ZeroOneAdam", "params": {"var_update_scaler": 0}}},
     ["'optimizer.params.var_update_scaler'", ">= 1", "0"]),
    ({"optimizer": {"type": "ZeroOneAdam", "params": {"freeze_step": 10}}},
     ["unknown config key 'optimizer.params.freeze_step'"]),
    ({"optimizer": {"type": "OneBitLamb", "params": {"factor_max": 0.2}}},
     ["'optimizer.params.factor_max'", ">= factor_min"]),
    ({"optimizer": {"type": "OneBitLamb", "params": {"coeff_beta": 1.0}}},
     ["'optimizer.params.coeff_beta'", "[0, 1)"]),
    ({"optimizer": {"type": "ZeroOneAdam", "params": {"eps_inside_sqrt": True}}},
     ["'optimizer.params.eps_inside_sqrt'", "not supported"]),
    ({"comms_logger": {"enabled": True, "prof_ops": ["allreduce"]}},
     ["'comms_logger.prof_ops'", '"allreduce"', "did you mean 'all_reduce'"]),
    ({"aio": {"queue_dept": 8}}, ["unknown config key 'aio.queue_dept'", "did you mean 'queue_depth'"]),
    ({"communication_data_type": "fp8"}, ["'communication_data_type'", '"fp8"']),
    ({"gradient_predivide_factor": 0}, ["'gradient_predivide_factor'", "> 0"]),
    ({"wall_clock_breakdown": 1}, ["'wall_clock_breakdown'", "boolean"]),
    ({"comms_timeout_s": -1}, ["'comms_timeout_s'", "> 0"]),
]


@pytest.mark.parametrize("overrides,fragments", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_config_is_refused_with_a_clear_message(overrides, fragments):
    config = {**OK, **overrides}
    model = torch.nn.Linear(3, 1)
    before = model.weight.detach().clone()
    with pytest.raises(zeal.ConfigError) as info:
        zeal.initialize(model=model, config=config)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert isinstance(info.value, ValueError)
    # Nothing lost: the model is left as it was.
    assert torch.equal(model.weight, before) and model.weight.dtype == torch.float32


def test_table_is_large_enough():
    assert len(BAD) >= 15


def test_missing_optimizer_and_file():
    with pytest.raises(zeal.ConfigError, match="'optimizer'"):
        zeal.initialize(model=torch.nn.Linear(3, 1), config={"train_batch_size": 2})
    with pytest.raises(zeal.ConfigError, match="does not exist"):
        zeal.initialize(model=torch.nn.Linear(3, 1), config="/nonexistent/config.json")
