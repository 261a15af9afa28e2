"""The Python face of the C++ engine: DeepSpeed's initialize / engine API over zeal._zeal.Engine.

The C++ engine owns the training state; the model's parameters become views into its flat
buffers. This module only adapts arguments, times forward, and builds the data loader.
"""
import collections
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

    names, aliases = {}, {}
    for n, p in model.named_parameters(remove_duplicate=False):  # a tied weight: one tensor, several names
        if id(p) in names:
            aliases.setdefault(id(p), []).append(n)
        else:
            names[id(p)] = n
    for g in groups:
        g["names"] = [names.get(id(p), "") for p in g["params"]]
        g["aliases"] = [aliases.get(id(p), []) for p in g["params"]]
        g["splits"] = [split_of(p) for p in g["params"]]
        if any(hasattr(p, "_zeal_chunk") for p in g["params"]):  # partitioned by zeal.zero.Init
            g["full_shapes"] = [list(getattr(p, "_zeal_full_shape", p.shape)) for p in g["params"]]
            g["chunks"] = [p._zeal_chunk.to(dtype) if hasattr(p, "_zeal_chunk") else None for p in g["params"]]
    return groups


class ZealOptimizer(torch.optim.Optimizer):
    """What initialize returns as the optimizer: a torch.optim.Optimizer over the engine's optimizer,
    so torch and Hugging Face LR schedulers drive it as they drive any other. param_groups are the
    dicts the step reads: with a config 'optimizer' section, Zeal's (one per group, the model's
    parameters under "params"); with optimizer= in initialize, the user's own. A value written to
    group["lr"] takes effect at the next step (engine.step() hands it to the engine first).

    The engine steps it: call engine.step(), not optimizer.step()."""

    def __init__(self, core, param_groups, client=None):
        # Optimizer.__init__ would register the parameters again; set what torch's hooks and
        # schedulers read instead.
        self._core = core
        self._client = client
        self.defaults = dict(client.optimizer.defaults) if client else \
            {k: v for k, v in param_groups[0].items() if k != "params"}
        self.param_groups = client.optimizer.param_groups if client else param_groups
        self.state = client.optimizer.state if client else collections.defaultdict(dict)
        self._optimizer_step_pre_hooks = collections.OrderedDict()
        self._optimizer_step_post_hooks = collections.OrderedDict()
        self._optimizer_state_dict_pre_hooks = collections.OrderedDict()
        self._optimizer_state_dict_post_hooks = collections.OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = collections.OrderedDict()
        self._optimizer_load_state_dict_post_hooks = collections.OrderedDict()
        self._zero_grad_profile_name = "Optimizer.zero_grad#ZealOptimizer.zero_grad"

    def __getstate__(self):
        raise TypeError("ZealOptimizer is a view of the engine's optimizer and cannot be pickled; save with "
                        "engine.save_checkpoint")

    def __repr__(self):
        return f"ZealOptimizer({self._core.optimizer_name}, {len(self.param_groups)} groups)"

    @property
    def optimizer(self):
        """The optimizer under the wrapper (DeepSpeed's .optimizer): the user's torch optimizer, or this."""
        return self._client.optimizer if self._client else self

    def step(self, closure=None):
        raise RuntimeError("ZealOptimizer is stepped by the engine: call engine.step() (it unscales, clips, "
                           "steps the optimizer and the LR schedule)")

    def zero_grad(self, set_to_none=True):
        self._core.zero_grad()

    # fp16 loss scaling, with DeepSpeed's names.
    @property
    def loss_scale(self):
        return self._core.loss_scale

    cur_scale = loss_scale

    @property
    def overflow(self):
        """Whether the last optimizer step was skipped for an fp16 gradient overflow."""
        return self._core.last_step_overflow

    @property
    def loss_scale_config(self):
        """DeepSpeed's LossScaleConfig: dynamic or static scaling and its current scale."""
        return _LossScaleConfig(self._core)

    def state_dict(self):
        """This rank's optimizer state (its ZeRO partition, as DeepSpeed's ZeRO optimizers give):
        the user's optimizer's own state_dict for a client optimizer; else the engine's state tensors
        by name, its step count and the groups' hyperparameters."""
        if self._client:
            return self._client.optimizer.state_dict()
        core = self._core
        return {"optimizer": core.optimizer_name, "steps": core.optimizer_steps,
                "state": {n: core.optimizer_state(n).clone() for n in core.optimizer_state_names()},
                "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups],
                "loss_scale": core.loss_scale}

    def load_state_dict(self, state_dict):
        if self._client:
            return self._client.optimizer.load_state_dict(state_dict)
        core = self._core
        if state_dict.get("optimizer") != core.optimizer_name:
            raise ValueError(f"load_state_dict: the state is of {state_dict.get('optimizer')!r}, this engine's "
                             f"optimizer is {core.optimizer_name!r}")
        for name, value in state_dict["state"].items():
            target = core.optimizer_state(name)
            if target.shape != value.shape:
                raise ValueError(f"load_state_dict: state {name!r} has {value.numel()} elements, this rank holds "
                                 f"{target.numel()} (saved at another world size or ZeRO stage? use checkpoints)")
            target.copy_(value)
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            group.update(saved)


class _LossScaleConfig:
    def __init__(self, core):
        self.dynamic_loss_scale = core.dynamic_loss_scale
        self.cur_scale = core.loss_scale
        self.use_grad_scaling = core.model_dtype == "Half"


class ZealLRScheduler:
    """What initialize returns for the config's 'scheduler' section; the engine steps it after each
    applied optimizer step (as DeepSpeed's engine does)."""

    def __init__(self, core):
        self._core = core

    def get_lr(self):
        return self._core.get_lr()

    get_last_lr = get_lr

    def get_mom(self):
        """Per group: beta1 (momentum for SGD), what OneCycle's cycle_momentum moves."""
        return self._core.get_mom()

    @property
    def last_batch_iteration(self):
        return self._core.global_steps - self._core.skipped_steps - 1

    def state_dict(self):
        return {"last_batch_iteration": self.last_batch_iteration}

    def load_state_dict(self, state_dict):
        """The schedule's position is the engine's step count: it comes back with load_checkpoint."""
        if state_dict.get("last_batch_iteration") != self.last_batch_iteration:
            raise ValueError("the config scheduler follows the engine's step count; restore it with "
                             "engine.load_checkpoint")


# The key under which a checkpoint's client_state carries the user's optimizer hyperparameters and
# scheduler state (ZealEngine._client_objects_state); load_checkpoint removes it again.
_CLIENT_KEY = "__zeal_client_objects__"


class EngineAPI:
    """DeepSpeed's engine queries and properties, over self._core (the C++ engine), self._config (the
    config dict), self.optimizer and self.lr_scheduler: one definition for ZealEngine and
    PipelineEngine. docs/compatibility.md lists each against DeepSpeed's."""

    # --- batch and step accounting ---
    def train_batch_size(self):
        return self._core.train_batch_size

    def train_micro_batch_size_per_gpu(self):
        return self._core.train_micro_batch_size_per_gpu

    def gradient_accumulation_steps(self):
        return self._core.gradient_accumulation_steps

    def get_batch_info(self):
        return self.train_batch_size(), self.train_micro_batch_size_per_gpu(), self.gradient_accumulation_steps()

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

    def is_gradient_accumulation_boundary(self):
        return self._core.is_gradient_accumulation_boundary()

    def set_gradient_accumulation_boundary(self, is_boundary):
        """Overrides the boundary (DeepSpeed's, for callers that run their own accumulation): True
        makes the next backward reduce and the next step apply, False holds both."""
        self._core.set_boundary_override(1 if is_boundary else 0)

    def was_step_applied(self):
        """Whether the latest step() updated the parameters: False between accumulation boundaries
        and on an fp16 overflow."""
        return getattr(self, "_step_applied", False)

    def get_global_grad_norm(self):
        """The unscaled global gradient norm of the last applied step; None when the engine computed
        none (fp32 or bf16 without gradient_clipping, where the step needs no norm)."""
        if self.global_steps == 0 or not self._needs_norm():
            return None
        return self._core.last_grad_norm

    def _needs_norm(self):
        return self.fp16_enabled() or self.gradient_clipping() > 0

    # --- learning rate and momentum (read from the optimizer's groups, as DeepSpeed's) ---
    def get_lr(self):
        return [group.get("lr", 0.0) for group in self.optimizer.param_groups]

    def get_mom(self):
        name = self.optimizer_name() or ""
        if name.lower() in ("sgd", "rmsprop"):
            return [group.get("momentum", 0.0) for group in self.optimizer.param_groups]
        return [group.get("betas") for group in self.optimizer.param_groups]

    # --- config queries ---
    def optimizer_name(self):
        if getattr(self, "_client_optimizer", None) is not None:
            return type(self._client_optimizer).__name__
        opt = self._config.get("optimizer")
        return opt.get("type").lower() if isinstance(opt, dict) and isinstance(opt.get("type"), str) else None

    def optimizer_params(self):
        return (self._config.get("optimizer") or {}).get("params")

    def scheduler_name(self):
        return (self._config.get("scheduler") or {}).get("type")

    def scheduler_params(self):
        return (self._config.get("scheduler") or {}).get("params")

    def fp16_enabled(self):
        return bool((self._config.get("fp16") or {}).get("enabled", False))

    def bfloat16_enabled(self):
        return any(bool((self._config.get(k) or {}).get("enabled", False)) for k in ("bf16", "bfloat16"))

    def amp_enabled(self):
        return False

    def fp16_auto_cast(self):
        return False

    def dynamic_loss_scale(self):
        return self._core.dynamic_loss_scale

    def gradient_clipping(self):
        return float(self._config.get("gradient_clipping", 0.0))

    def steps_per_print(self):
        return self._core.steps_per_print

    def wall_clock_breakdown(self):
        return self._core.wall_clock_breakdown

    def zero_optimization(self):
        return self.zero_optimization_stage() > 0

    def zero_optimization_stage(self):
        return self._core.zero_stage

    def zero_optimization_partition_gradients(self):
        return self.zero_optimization_stage() >= 2

    def zero_optimization_partition_weights(self):
        return self.zero_optimization_stage() >= 3

    def zero_allow_untested_optimizer(self):
        return bool(self._config.get("zero_allow_untested_optimizer", False))

    def zero_force_ds_cpu_optimizer(self):
        return bool(self._config.get("zero_force_ds_cpu_optimizer", True))

    def zero_cpu_offload(self):
        zero = self._config.get("zero_optimization")
        zero = zero if isinstance(zero, dict) else {}
        off = zero.get("offload_optimizer") or {}
        return str(off.get("device", "none")).lower() == "cpu" or zero.get("cpu_offload") is True

    def get_data_types(self):
        dtype = torch.float16 if self.fp16_enabled() else torch.bfloat16 if self.bfloat16_enabled() else torch.float32
        return dtype, dtype

    @property
    def communication_data_type(self):
        name = self._config.get("communication_data_type")
        names = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "bfp16": torch.bfloat16}
        return names[name] if name else self.get_data_types()[0]

    # --- ranks and device ---
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

    @property
    def local_rank(self):
        from . import comm

        return comm.get_local_rank()


class ZealEngine(EngineAPI, torch.nn.Module):
    """Wraps the user's module. `engine(*args)` runs forward; backward() and step() as DeepSpeed."""

    def __init__(self, module: torch.nn.Module, core, config=None, optimizer=None, lr_scheduler=None,
                 client_optimizer=None, client_lr_scheduler=None, training_dataloader=None):
        super().__init__()
        self.module = module
        self._core = core
        self._config = dict(config or {})
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self._client_optimizer = client_optimizer
        self._client_lr_scheduler = client_lr_scheduler  # stepped after each applied step
        self.training_dataloader = training_dataloader
        self._step_applied = False
        fp16 = self._config.get("fp16") or {}
        self._auto_cast = bool(fp16.get("enabled", False) and fp16.get("auto_cast", False))
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
        for i, p in enumerate(core.parameters):  # zeal.utils.safe_get_full_* find the engine through it
            p._zeal_owner = (core, i)

    def __getattr__(self, name):
        # As DeepSpeed's engine: an attribute the engine lacks is looked up on the wrapped module.
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if "module" in modules and name != "module":
                return getattr(modules["module"], name)
            raise

    @property
    def device(self):
        return self._core.parameters[0].device

    @property
    def basic_optimizer(self):
        return self._client_optimizer if self._client_optimizer is not None else self.optimizer

    @property
    def loss_scale(self):
        return self._core.loss_scale

    def forward(self, *args, **kwargs):
        start = time.perf_counter()
        if self._auto_cast:  # fp16.auto_cast: floating inputs to fp16, as DeepSpeed's engine
            args, kwargs = _to_half(args), _to_half(kwargs)
        if self._stage3 is None:
            out = self.module(*args, **kwargs)
        else:
            with self._stage3.saved_tensors():
                out = self.module(*args, **kwargs)
        self._core.add_forward_time(time.perf_counter() - start)
        return out

    def backward(self, loss, retain_graph=False, scale_wrt_gas=True):
        """Scaled backward with the gradient reduction; returns the loss divided by
        gradient_accumulation_steps (scale_wrt_gas) or the loss itself, as DeepSpeed's."""
        if self._stage3 is not None:
            self._stage3.begin_backward()
            self._core.backward(loss, retain_graph, scale_wrt_gas)
            self._stage3.end_backward()
        else:
            self._core.backward(loss, retain_graph, scale_wrt_gas)
        return loss / self.gradient_accumulation_steps() if scale_wrt_gas else loss

    def step(self, lr_kwargs=None):
        """On the accumulation boundary: the optimizer step (with the learning rates now in the
        optimizer's param_groups), then the LR schedule; between boundaries it only counts."""
        core = self._core
        boundary = core.is_gradient_accumulation_boundary()
        groups = self.optimizer.param_groups
        if boundary:
            core.set_lr([float(g["lr"]) for g in groups])
        skipped = core.skipped_steps
        core.step()
        self._step_applied = boundary and core.skipped_steps == skipped
        if boundary:
            _pull_lr(core, groups)  # a config scheduler moved them
            if self._step_applied and self._client_lr_scheduler is not None:
                try:
                    self._client_lr_scheduler.step(**(lr_kwargs or {}))
                except TypeError:  # DeepSpeed's fallback for schedulers that take the sample count
                    self._client_lr_scheduler.step(self.train_batch_size())

    def zero_grad(self):
        self._core.zero_grad()

    def empty_partition_cache(self):
        """ZeRO-3: release every gathered parameter (DeepSpeed's; a no-op below stage 3)."""
        if self._stage3 is not None:
            self._stage3.release_all()

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
        client_state = dict(client_state or {})
        if self._client_optimizer is not None or self._client_lr_scheduler is not None:
            client_state[_CLIENT_KEY] = self._client_objects_state()
        try:
            client_json = json.dumps(client_state)
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
        client_state = json.loads(client_json)
        saved = client_state.pop(_CLIENT_KEY, None)
        if saved is not None and not load_module_only:
            if load_optimizer_states and self._client_optimizer is not None:
                for group, hyper in zip(self.optimizer.param_groups, saved.get("param_groups", [])):
                    group.update({k: tuple(v) if k == "betas" else v for k, v in hyper.items()})
            if load_lr_scheduler_states and self._client_lr_scheduler is not None and saved.get("lr_scheduler"):
                self._client_lr_scheduler.load_state_dict(saved["lr_scheduler"])
        if self._client_optimizer is None or isinstance(self.lr_scheduler, ZealLRScheduler):
            _pull_lr(self._core, self.optimizer.param_groups)  # the engine's schedule came back with the step count
        return path, client_state

    def _client_objects_state(self):
        """What a checkpoint keeps of the user's optimizer and scheduler beyond the state tensors the
        engine saves: the groups' hyperparameters and the scheduler's state_dict, as JSON."""
        def plain(value):
            return isinstance(value, (int, float, str, bool, type(None))) or (
                isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value))

        out = {}
        if self._client_optimizer is not None:
            out["param_groups"] = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()
                                    if k != "params" and plain(v)} for g in self.optimizer.param_groups]
        if self._client_lr_scheduler is not None:
            state = self._client_lr_scheduler.state_dict()
            try:
                json.dumps(state)
            except (TypeError, ValueError) as e:
                name = type(self._client_lr_scheduler).__name__
                raise _zeal.CheckpointError(f"the lr_scheduler passed to initialize ({name}) has a state_dict that is "
                                            f"not JSON ({e}); Zeal checkpoints never pickle") from None
            out["lr_scheduler"] = state
        return out

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
    if mpu is not None:
        raise _zeal.ConfigError("initialize: mpu= (a Megatron-style model-parallel unit over torch.distributed groups) "
                                "is not supported; pass data_parallel_group= and model_parallel_group= "
                                "(zeal.tensor_parallel.make_groups), or use a zeal.pipe.PipelineModule")
    cfg = load_config(config, args, config_params)
    from .pipe import PipelineEngine, PipelineModule

    if isinstance(model, PipelineModule):
        if optimizer is not None or lr_scheduler is not None:
            raise _zeal.ConfigError("initialize: optimizer= and lr_scheduler= with a PipelineModule are not supported "
                                    "yet; configure config keys 'optimizer' and 'scheduler'")
        stage_cfg = {k: v for k, v in cfg.items() if k != "pipeline"}
        parsed = _zeal.validate_config(to_json(stage_cfg))  # serialised once, parsed once: the engine takes it
        if cfg.get("zero_optimization", {}).get("stage", 0) > 2:
            raise _zeal.ConfigError("config key 'zero_optimization.stage': pipeline parallelism works with ZeRO "
                                    f"stage 0, 1 or 2, got {cfg['zero_optimization']['stage']}")
        precision = _precision(cfg)
        if precision in _DTYPES:
            model.to(_DTYPES[precision])
        engine = PipelineEngine(model, {**stage_cfg, "pipeline": cfg.get("pipeline", {})}, parsed_config=parsed,
                                training_data=training_data, collate_fn=collate_fn)
        return engine, engine.optimizer, engine.training_dataloader, engine.lr_scheduler
    if "pipeline" in cfg:
        raise _zeal.ConfigError("config key 'pipeline': pipeline parallelism needs the model to be a "
                                "zeal.pipe.PipelineModule")
    # Serialised once and parsed once (Config::parse_text): a bad config fails here, before the
    # model is touched, and the engine takes the parsed config as it is.
    parsed = _zeal.validate_config(to_json(cfg))

    precision = _precision(cfg)
    dtype = _DTYPES.get(precision, torch.float32)
    client = torch_optimizer = None
    if optimizer is not None:
        from . import client_optim

        if "optimizer" in cfg:  # DeepSpeed's rule: the client optimizer is used, the section ignored
            import warnings

            warnings.warn("initialize: the config has an 'optimizer' section and optimizer= is used (as DeepSpeed "
                          "does); the section is ignored")
            cfg = {k: v for k, v in cfg.items() if k != "optimizer"}
            parsed = _zeal.validate_config(to_json(cfg))
        torch_optimizer = client_optim.build(optimizer, list(model.parameters()) if model_parameters is None
                                             else list(model_parameters))
        client_optim.check_allowed(torch_optimizer, cfg)
        model_parameters = client_optim.engine_groups(torch_optimizer)
        client = client_optim.ClientAdapter(torch_optimizer)
    if precision in _DTYPES:
        model.to(dtype)
    core = _zeal.Engine(_param_groups(model, model_parameters, dtype), parsed, data_parallel_group, client)
    if client is not None:
        client.bind(core)
    if model_parallel_group is None:
        model_parallel_group = next((m.group for m in model.modules() if getattr(m, "tensor_parallel_layer", False)),
                                    None)
    if model_parallel_group is not None and model_parallel_group.size > 1:
        # Parameters replicated across the tensor group count in the norm on its first rank only.
        uncounted = [] if model_parallel_group.rank == 0 else \
            [p for p in model.parameters() if p.requires_grad and not getattr(p, "tensor_parallel", False)]
        core.set_model_parallel_group(model_parallel_group, uncounted)

    zeal_optimizer = ZealOptimizer(core, _optimizer_groups(core, model, model_parameters), client)
    _pull_lr(core, zeal_optimizer.param_groups)
    scheduler, client_scheduler = _lr_scheduler(cfg, core, zeal_optimizer, lr_scheduler)
    loader = None
    if training_data is not None:
        from .data import distributed_loader

        loader = distributed_loader(training_data, core.train_micro_batch_size_per_gpu, core.rank,
                                    core.world_size, collate_fn)
    engine = ZealEngine(model, core, cfg, zeal_optimizer, scheduler, torch_optimizer, client_scheduler, loader)
    if model_parallel_group is not None and model_parallel_group.size > 1:
        engine._tensor_group = model_parallel_group
    return engine, zeal_optimizer, loader, scheduler


def _to_half(value):
    if torch.is_tensor(value):
        return value.half() if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(_to_half(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_half(v) for k, v in value.items()}
    return value


def _optimizer_groups(core, model, model_parameters):
    """The param_groups of Zeal's own optimizer: the model's parameters of each group, with the
    group's hyperparameters (the engine's learning rates; the config's or the group's others)."""
    params = list(model.parameters() if model_parameters is None else model_parameters)
    if not params or not isinstance(params[0], dict):
        params = [{"params": params}]
    lrs = core.get_lr()
    moms = core.get_mom()
    groups = []
    for g, (spec, lr) in enumerate(zip(params, lrs)):
        group = {k: v for k, v in spec.items() if k != "params"}
        group.update(params=[p for p in spec["params"] if p.requires_grad], lr=lr)
        group.setdefault("betas", (moms[g], 0.999) if "betas" not in spec else spec["betas"])
        groups.append(group)
    return groups


def _pull_lr(core, groups):
    for group, lr in zip(groups, core.get_lr()):
        group["lr"] = lr


def _lr_scheduler(cfg, core, optimizer, client):
    """DeepSpeed's choice: the config's scheduler section wins (the engine steps it); else the user's
    scheduler (an object, or a callable given the optimizer), stepped by engine.step() after each
    applied step. Returns (what initialize returns, what the engine steps itself)."""
    if "scheduler" in cfg:
        if client is not None:
            import warnings

            warnings.warn("initialize: both a config 'scheduler' and lr_scheduler= were given; the config's is "
                          "used, as DeepSpeed does")
        return ZealLRScheduler(core), None
    if client is None:
        return None, None
    if not hasattr(client, "step") and callable(client):
        client = client(optimizer.optimizer)
    if not hasattr(client, "step"):
        raise _zeal.ConfigError(f"initialize: lr_scheduler= must be an LR scheduler or a callable that builds one "
                                f"from the optimizer, got {type(client).__name__}")
    return client, client


def _check_save_dir(save_dir):
    """DeepSpeed's save_checkpoint needs a directory: None or "" would save into './None' or the
    working directory."""
    if save_dir is None or not isinstance(save_dir, (str, os.PathLike)) or not str(save_dir):
        raise ValueError(f"save_checkpoint: save_dir must name a directory, got {save_dir!r}")
