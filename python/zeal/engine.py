"""The Python face of the C++ engine: DeepSpeed's initialize / engine API over zeal._zeal.Engine.

The C++ engine owns the training state; the model's parameters become views into its flat
buffers. This module only adapts arguments, times forward, and builds the data loader.
"""
import json
import os
import time

import torch

from . import _zeal
from .config import load_config, to_json

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _precision(config: dict):
    if config.get("fp16", {}).get("enabled", False):
        return "fp16"
    for key in ("bf16", "bfloat16"):
        if config.get(key, {}).get("enabled", False):
            return "bf16"
    return "fp32"


def _param_groups(model, model_parameters, dtype):
    params = list(model.parameters() if model_parameters is None else model_parameters)
    if params and isinstance(params[0], dict):
        groups = []
        for g in params:
            group = {k: v for k, v in g.items() if k in ("lr", "weight_decay", "betas", "eps")}
            group["params"] = list(g["params"])
            groups.append(group)
    else:
        groups = [{"params": params}]
    from .tensor_parallel import split_of

    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        g["names"] = [names.get(id(p), "") for p in g["params"]]
        g["splits"] = [split_of(p) for p in g["params"]]
        if any(hasattr(p, "_zeal_chunk") for p in g["params"]):  # partitioned by zeal.zero.Init
            g["full_shapes"] = [list(getattr(p, "_zeal_full_shape", p.shape)) for p in g["params"]]
            g["chunks"] = [p._zeal_chunk.to(dtype) if hasattr(p, "_zeal_chunk") else None for p in g["params"]]
    return groups


class ZealOptimizer:
    """What initialize returns as the optimizer: a view of the engine's optimizer state."""

    def __init__(self, core):
        self._core = core

    @property
    def param_groups(self):
        return [{"lr": lr} for lr in self._core.get_lr()]

    @property
    def loss_scale(self):
        return self._core.loss_scale

    cur_scale = loss_scale


class ZealLRScheduler:
    """What initialize returns as the scheduler; the engine steps it after each applied step."""

    def __init__(self, core):
        self._core = core

    def get_lr(self):
        return self._core.get_lr()

    get_last_lr = get_lr


class ZealEngine(torch.nn.Module):
    """Wraps the user's module. `engine(*args)` runs forward; backward() and step() as DeepSpeed."""

    def __init__(self, module: torch.nn.Module, core):
        super().__init__()
        self.module = module
        self._core = core
        self._stage3 = None
        self._tensor_group = None  # the tensor-parallel group, when the model has sharded layers
        if core.zero_stage == 3:
            from .zero import Stage3Hooks

            for i, (p, shape) in enumerate(zip(core.parameters, core.parameter_shapes)):
                p._zeal_engine, p._zeal_index = core, i
                p.ds_shape, p.ds_numel = tuple(shape), core.param_numel(i)
                for attr in ("_zeal_chunk", "_zeal_full_shape"):
                    if hasattr(p, attr):
                        delattr(p, attr)
            self._stage3 = Stage3Hooks(module, core)

    def forward(self, *args, **kwargs):
        start = time.perf_counter()
        if self._stage3 is None:
            out = self.module(*args, **kwargs)
        else:
            with self._stage3.saved_tensors():
                out = self.module(*args, **kwargs)
        self._core.add_forward_time(time.perf_counter() - start)
        return out

    def backward(self, loss):
        if self._stage3 is not None:
            self._stage3.begin_backward()
            self._core.backward(loss)
            self._stage3.end_backward()
        else:
            self._core.backward(loss)
        return loss

    def step(self):
        self._core.step()

    def zero_grad(self):
        self._core.zero_grad()

    # --- checkpoints (DeepSpeed's signatures) ---------------------------------------------------
    def _extra_state(self, exclude_frozen_parameters=False):
        """Module state the engine does not train: buffers and frozen parameters, by state_dict name."""
        managed = {id(p) for p in self._core.parameters}
        extra = {}
        for name, t in self.module.state_dict(keep_vars=True).items():
            if id(t) in managed or not isinstance(t, torch.Tensor):
                continue
            if exclude_frozen_parameters and isinstance(t, torch.nn.Parameter):
                continue
            extra[name] = t.detach()
        return extra

    def save_checkpoint(self, save_dir, tag=None, client_state={}, save_latest=True, exclude_frozen_parameters=False):
        """Every rank writes its shard; returns True as DeepSpeed does. client_state must be JSON-serialisable
        (checkpoints never pickle). With tensor-parallel layers each tensor rank's engine saves one
        part, <tag>/tensor<t>, its slices recorded with their place in the full tensors."""
        _check_save_dir(save_dir)
        if tag is None:
            tag = f"global_step{self.global_steps}"
        try:
            client_json = json.dumps(client_state or {})
        except RecursionError:
            raise _zeal.CheckpointError("client_state is nested too deeply to save") from None
        except (TypeError, ValueError) as e:
            raise _zeal.CheckpointError(f"client_state must be JSON-serialisable (Zeal checkpoints never pickle): {e}")
        extra = [] if self._core.rank != 0 else sorted(self._extra_state(exclude_frozen_parameters).items())
        tensor = self._tensor_group
        if tensor is None:
            self._core.save_checkpoint(str(save_dir), str(tag), client_json, extra, save_latest)
        else:  # one part per tensor rank, each sharded over its data group
            from .checkpoint import save_parts

            save_parts(self._core, _zeal.world(), str(save_dir), str(tag), f"tensor{tensor.rank}",
                       [f"tensor{t}" for t in range(tensor.size)], {"tensor": tensor.size, "data": self.dp_world_size},
                       client_json, extra, save_latest)
        return True

    def load_checkpoint(self, load_dir, tag=None, load_module_strict=True, load_optimizer_states=True,
                        load_lr_scheduler_states=True, load_module_only=False, custom_load_fn=None):
        """Returns (checkpoint path, client_state) like DeepSpeed; (None, None) if load_dir holds no checkpoint.
        Any Zeal checkpoint of the same parameter names loads, whatever its world size, ZeRO stage and
        tensor-parallel size."""
        if custom_load_fn is not None:
            raise _zeal.ConfigError("load_checkpoint: custom_load_fn is not supported")
        import os

        from .checkpoint import checkpoint_location

        if tag is None and not os.path.lexists(os.path.join(str(load_dir), "latest")):
            return None, None
        path, parts = checkpoint_location(str(load_dir), None if tag is None else str(tag))  # parts: tensor ranks
        _, client_json = self._core.load_checkpoint_parts(parts, load_optimizer_states, load_lr_scheduler_states,
                                                          load_module_only)
        extra = _zeal.read_checkpoint_extra(parts[0])
        if extra:
            own = self._extra_state()
            missing = sorted(n for n in set(own) - set(extra) if not isinstance(own[n], torch.nn.Parameter))
            if missing and load_module_strict:
                raise _zeal.CheckpointError(f"checkpoint {path} lacks module state {missing}")
            with torch.no_grad():
                for name, value in extra.items():
                    if name in own:
                        own[name].copy_(value)
        return path, json.loads(client_json)

    def is_gradient_accumulation_boundary(self):
        return self._core.is_gradient_accumulation_boundary()

    def comms_log_summary(self, show=True):
        """comms_logger: {op: {"calls": n, "bytes": b}} for this rank since initialize (message
        bytes: each call's input tensor). With show, rank 0 also prints a table. Empty when the
        config's comms_logger is off."""
        counts = self._core.comms_counts
        if show and counts and self.global_rank == 0:
            print(f"{'op':<16}{'calls':>10}{'bytes':>16}")
            for op, c in sorted(counts.items()):
                print(f"{op:<16}{c['calls']:>10}{c['bytes']:>16}")
            skipped = self._core.skipped_comm_rounds
            if skipped:
                print(f"{'(skipped rounds)':<16}{skipped:>10}{0:>16}")
        return counts

    @property
    def skipped_comm_rounds(self):
        """Steps on which the optimizer communicated nothing (0/1 Adam's local steps)."""
        return self._core.skipped_comm_rounds

    def get_lr(self):
        return self._core.get_lr()

    def train_batch_size(self):
        return self._core.train_batch_size

    def train_micro_batch_size_per_gpu(self):
        return self._core.train_micro_batch_size_per_gpu

    def gradient_accumulation_steps(self):
        return self._core.gradient_accumulation_steps

    @property
    def global_steps(self):
        return self._core.global_steps

    @property
    def global_samples(self):
        return self._core.global_samples

    @property
    def micro_steps(self):
        return self._core.micro_steps

    @property
    def skipped_steps(self):
        return self._core.skipped_steps

    @property
    def loss_scale(self):
        return self._core.loss_scale

    @property
    def global_rank(self):
        """This rank in the whole world (with a data_parallel_group, not its rank in that group)."""
        return _zeal.world().rank

    @property
    def world_size(self):
        return _zeal.world().size

    @property
    def dp_world_size(self):
        """The ranks that hold replicas of this rank's parameters (the data-parallel group)."""
        return self._core.world_size


def initialize(
    args=None,
    model=None,
    optimizer=None,
    model_parameters=None,
    training_data=None,
    lr_scheduler=None,
    mpu=None,
    dist_init_required=None,
    collate_fn=None,
    config=None,
    config_params=None,
    data_parallel_group=None,
    model_parallel_group=None,
):
    """DeepSpeed's initialize: returns (engine, optimizer, training_dataloader, lr_scheduler).

    Zeal's tensor-parallel arguments (zeal.tensor_parallel.make_groups gives both groups):
    data_parallel_group, the ranks that hold replicas of this rank's parameters (the world by
    default); model_parallel_group, the ranks that hold the other shards (the tensor group of the
    model's tensor-parallel layers by default), across which gradient norms are summed."""
    if model is None:
        raise _zeal.ConfigError("initialize needs model=")
    if optimizer is not None:
        raise _zeal.ConfigError("passing a torch optimizer object is not supported yet; "
                                "configure it under config key 'optimizer'")
    if lr_scheduler is not None:
        raise _zeal.ConfigError("passing a scheduler object is not supported yet; "
                                "configure it under config key 'scheduler'")
    if mpu is not None:
        raise _zeal.ConfigError("mpu= (model parallelism) is not supported yet")
    cfg = load_config(config, args, config_params)
    from .pipe import PipelineEngine, PipelineModule

    if isinstance(model, PipelineModule):
        stage_cfg = {k: v for k, v in cfg.items() if k != "pipeline"}
        parsed = _zeal.validate_config(to_json(stage_cfg))  # serialised once, parsed once: the engine takes it
        if cfg.get("zero_optimization", {}).get("stage", 0) > 2:
            raise _zeal.ConfigError("config key 'zero_optimization.stage': pipeline parallelism works with ZeRO "
                                    f"stage 0, 1 or 2, got {cfg['zero_optimization']['stage']}")
        precision = _precision(cfg)
        if precision in _DTYPES:
            model.to(_DTYPES[precision])
        engine = PipelineEngine(model, {**stage_cfg, "pipeline": cfg.get("pipeline", {})}, parsed_config=parsed)
        return engine, ZealOptimizer(engine._core), None, ZealLRScheduler(engine._core) if "scheduler" in cfg else None
    if "pipeline" in cfg:
        raise _zeal.ConfigError("config key 'pipeline': pipeline parallelism needs the model to be a "
                                "zeal.pipe.PipelineModule")
    # Serialised once and parsed once (Config::parse_text): a bad config fails here, before the
    # model is touched, and the engine takes the parsed config as it is.
    parsed = _zeal.validate_config(to_json(cfg))

    precision = _precision(cfg)
    dtype = _DTYPES.get(precision, torch.float32)
    if precision in _DTYPES:
        model.to(dtype)
    core = _zeal.Engine(_param_groups(model, model_parameters, dtype), parsed, data_parallel_group)
    if model_parallel_group is None:
        model_parallel_group = next((m.group for m in model.modules() if getattr(m, "tensor_parallel_layer", False)),
                                    None)
    if model_parallel_group is not None and model_parallel_group.size > 1:
        # Parameters replicated across the tensor group count in the norm on its first rank only.
        uncounted = [] if model_parallel_group.rank == 0 else \
            [p for p in model.parameters() if p.requires_grad and not getattr(p, "tensor_parallel", False)]
        core.set_model_parallel_group(model_parallel_group, uncounted)
    engine = ZealEngine(model, core)
    if model_parallel_group is not None and model_parallel_group.size > 1:
        engine._tensor_group = model_parallel_group

    loader = None
    if training_data is not None:
        from .data import distributed_loader

        loader = distributed_loader(training_data, core.train_micro_batch_size_per_gpu, core.rank,
                                    core.world_size, collate_fn)
    scheduler = ZealLRScheduler(core) if "scheduler" in cfg else None
    return engine, ZealOptimizer(core), loader, scheduler


def _check_save_dir(save_dir):
    """DeepSpeed's save_checkpoint needs a directory: None or "" would save into './None' or the
    working directory."""
    if save_dir is None or not isinstance(save_dir, (str, os.PathLike)) or not str(save_dir):
        raise ValueError(f"save_checkpoint: save_dir must name a directory, got {save_dir!r}")
