"""The Python face of the C++ engine: DeepSpeed's initialize / engine API over zeal._zeal.Engine.

The C++ engine owns the training state; the model's parameters become views into its flat
buffers. This module only adapts arguments, times forward, and builds the data loader.
"""
import collections
import functools
import json
import os
import time

import torch

from . import _zeal
from .config import load_config, to_json

def _model_dtype(parsed):
    """The dtype the model trains in, from the parsed config (fp16, bf16 or fp32)."""
    return torch.float16 if parsed.fp16_enabled else torch.bfloat16 if parsed.bf16_enabled else torch.float32


def _process_groups(model, data_parallel_group, model_parallel_group, sequence_parallel_size=1, mpu=None, hpz=1,
                    mics=-1):
    """The mesh the engine trains on: the one the given groups (or the model's tensor-parallel
    layers' group, or the mesh its MoE or sequence layers use, or the mpu's) were cut from, else
    data parallelism over the world with the config's sequence_parallel_size as its sequence axis
    and its zero_hpz_partition_size (ZeRO++ hpZ's node groups) or mics_shard_size (MiCS's shard
    groups) as the data_inner axis."""
    groups = _mesh_of(model, data_parallel_group, model_parallel_group, mpu)
    if groups is None:
        from . import mesh

        inner, key = (mics, "mics_shard_size") if mics > 0 else (hpz, "zero_hpz_partition_size")
        try:
            groups = mesh.build(sequence=sequence_parallel_size, data_inner=inner)
        except ValueError as e:  # the axes do not divide the world: name the key that asked for data_inner
            if inner == 1:
                raise
            raise _zeal.ConfigError(f"config key 'zero_optimization.{key}': {inner} must divide the "
                                    f"data-parallel ranks ({e})") from None
    if sequence_parallel_size > 1 and groups.mesh.axis_size("sequence") != sequence_parallel_size:
        raise _zeal.ConfigError(f"config key 'sequence_parallel_size': {sequence_parallel_size}, but the model's "
                                f"sequence layers (or mpu=) use the mesh {groups.mesh!r}, whose sequence axis "
                                f"is {groups.mesh.axis_size('sequence')}")
    return groups


def _mesh_of(model, data_parallel_group, model_parallel_group, mpu):
    from . import mesh

    world = _zeal.world()
    tensor_group = model_parallel_group or next(
        (m.group for m in model.modules() if getattr(m, "tensor_parallel_layer", False)), None)
    groups = None
    if data_parallel_group is not None and data_parallel_group == world:
        groups = mesh.build()  # data parallelism over the whole world
    elif data_parallel_group is not None:
        groups, axes = mesh.owner(data_parallel_group)
        if groups is None or "tensor" in axes or "pipe" in axes:
            raise _zeal.ConfigError("initialize: data_parallel_group= must be the data group of a Zeal mesh "
                                    "(zeal.tensor_parallel.make_groups or zeal.mesh.build cut it)")
    if tensor_group is not None and tensor_group.size > 1:
        owner, axes = mesh.owner(tensor_group)
        if groups is None and owner is not None and axes == ["tensor"]:
            groups = owner
        elif groups is None and tensor_group == world:
            groups = mesh.build(tensor=world.size)
        elif groups is None or owner is not groups or axes != ["tensor"]:
            raise _zeal.ConfigError("initialize: the tensor-parallel group (model_parallel_group=, or the group the "
                                    "model's tensor-parallel layers use) must be the tensor group of the mesh "
                                    "data_parallel_group= came from (zeal.tensor_parallel.make_groups gives both)")
    # MoE and sequence layers hold the mesh their groups came from (zeal.moe.layer: the expert axis;
    # zeal.sequence: the sequence axis); the engine trains on it.
    layer_meshes = []
    for m in model.modules():
        g = getattr(m, "_zeal_groups", None)
        if g is not None and all(g is not x for x in layer_meshes):
            layer_meshes.append(g)
    if mpu is not None and all(mpu is not x for x in layer_meshes):
        layer_meshes.append(mpu)
    if len(layer_meshes) > 1:
        raise _zeal.ConfigError("initialize: the model's MoE or sequence layers (or mpu=) use different meshes ("
                                + ", ".join(repr(g.mesh) for g in layer_meshes) + "); one job trains on one "
                                "mesh, so every such layer needs the same ep_size and sequence group")
    if layer_meshes:
        if groups is None:
            groups = layer_meshes[0]
        elif groups is not layer_meshes[0]:
            raise _zeal.ConfigError(f"initialize: the model's MoE or sequence layers use the mesh "
                                    f"{layer_meshes[0].mesh!r}, but data_parallel_group= (or the tensor "
                                    "group) came from another mesh; pass that mesh's data group")
    return groups


def _sample_shard(groups):
    """(this rank's share, the number of shares) of a dataset: one per rank of the sample axes
    (Note [Samples per step]); tensor, ring and sequence ranks of one share read the same samples."""
    axes = [a for a in _zeal.sample_axes() if groups.mesh.axis_size(a) > 1]
    ranks = list(groups.mesh.group_of(axes, groups.rank)) if axes else [groups.rank]
    return ranks.index(groups.rank), len(ranks)


def _check_expert_counts(model, parts, path):
    """A checkpoint whose MoE layer holds another number of experts than the model's is refused
    before anything is read, naming a parameter one side has and the other lacks."""
    import os
    import re

    from .moe.layer import MoE

    layers = [(prefix, m.num_experts) for prefix, m in model.named_modules() if isinstance(m, MoE)]
    if not layers:
        return
    saved = []
    for part in parts:
        manifest = json.loads(_zeal.read_sealed_json(os.path.join(part, "zeal_checkpoint.json")))
        saved += [p["name"] for p in manifest.get("parameters", [])]
    for prefix, count in layers:
        head = (f"{prefix}." if prefix else "") + "deepspeed_moe.experts.deepspeed_experts."
        pattern = re.compile(re.escape(head) + r"(\d+)\.")
        ids = {}
        for name in saved:
            found = pattern.match(name)
            if found:
                ids.setdefault(int(found.group(1)), name)
        if not ids:
            continue
        extra = [i for i in ids if i >= count]
        if extra:
            raise _zeal.CheckpointError(
                f"checkpoint {path} holds expert parameter '{ids[min(extra)]}' (expert {min(extra)}), but the "
                f"model's MoE layer '{prefix}' has {count} experts (ids 0-{count - 1}): the checkpoint is of another "
                "model")
        missing = [i for i in range(count) if i not in ids]
        if missing:
            raise _zeal.CheckpointError(
                f"checkpoint {path} has no parameter '{head}{missing[0]}.*': the model's MoE layer '{prefix}' has "
                f"{count} experts, the checkpoint {len(ids)}")


def _check_init_groups(param_groups, groups):
    """A parameter zero.Init partitioned must have been cut over the group the engine will reduce and
    partition it over (its placement's reduction group on this mesh): the same ranks, not only as many."""
    from . import mesh

    for g in param_groups:
        for p, name, placement in zip(g["params"], g["names"], g["placements"]):
            init_group = getattr(p, "_zeal_group", None)
            if init_group is None:
                continue
            axes = _zeal.reduction_axes(groups.mesh, placement["split"])
            want = list(groups.mesh.group_of(axes, groups.rank))
            got = mesh.ranks_of(init_group)
            if got != want:
                raise _zeal.ConfigError(
                    f"parameter '{name}' was partitioned by zeal.zero.Init over world ranks {got}, but the engine "
                    f"reduces and partitions it over {'*'.join(axes) or 'no axis'} (world ranks {want}); pass that "
                    "group as zero.Init(data_parallel_group=...)")


def _param_groups(model, model_parameters, dtype, stage3=False):
    params = list(model.parameters() if model_parameters is None else model_parameters)
    if params and isinstance(params[0], dict):
        groups = []
        for g in params:
            group = {k: v for k, v in g.items() if k in ("lr", "weight_decay", "betas", "eps")}
            group["params"] = list(g["params"])
            groups.append(group)
    else:
        groups = [{"params": params}]
    if stage3:
        # Stage 3 partitions the module's frozen parameters too (Note [Frozen parameters]), also
        # those model_parameters leaves out (a LoRA script passes only the trainable ones); the
        # engine takes no optimizer group's settings from them.
        listed = {id(p) for g in groups for p in g["params"]}
        groups[0]["params"] += [p for p in model.parameters() if not p.requires_grad and id(p) not in listed]
    from . import mesh
    from .tensor_parallel import split_of

    names, aliases = {}, {}
    for n, p in model.named_parameters(remove_duplicate=False):  # a tied weight: one tensor, several names
        if id(p) in names:
            aliases.setdefault(id(p), []).append(n)
        else:
            names[id(p)] = n
    # Expert parameters go by their global expert ids (zeal.moe; Note [Checkpoints of several units]).
    from .moe.layer import MoE

    rename = {}
    for prefix, m in model.named_modules():
        if isinstance(m, MoE):
            rename.update(m.global_names(prefix))
    if rename:
        names = {k: rename.get(v, v) for k, v in names.items()}
        aliases = {k: [rename.get(a, a) for a in v] for k, v in aliases.items()}
    for g in groups:
        g["names"] = [names.get(id(p), "") for p in g["params"]]
        g["aliases"] = [aliases.get(id(p), []) for p in g["params"]]
        g["splits"] = [split_of(p) for p in g["params"]]
        g["placements"] = [mesh.placement_of(p) for p in g["params"]]
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

    def quantize_nontrainable_params(self):
        """DeepSpeed's step in ZeRO++'s LoRA recipe: store the stage-3 shards of parameters frozen
        since initialize as 8-bit blocks. Zeal partitions frozen parameters, and with
        zero_quantized_nontrainable_weights quantizes them, at initialize (Note [Frozen parameters]),
        so this has nothing to do; a parameter frozen after initialize is still one the engine
        trains, and is refused here rather than left as it is."""
        late = [n for n, p in zip(self._core.parameter_names, self._core.parameters) if not p.requires_grad]
        if late:
            raise _zeal.ConfigError(
                f"quantize_nontrainable_params: {len(late)} parameters were frozen after initialize ({late[:3]}"
                f"{' ...' if len(late) > 3 else ''}); the engine partitions them as trained ones. Freeze before "
                "zeal.initialize (as peft's get_peft_model does) and frozen weights are partitioned, and with "
                "zero_optimization.zero_quantized_nontrainable_weights stored quantized, from the start")

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
        """DeepSpeed's OneCycle.get_mom(): per group the betas (momentum, 0.99) while it cycles
        momentum, else None."""
        if not self._core.cycles_momentum:
            return None
        return [tuple(b) for b in self._core.get_betas()]

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

    def _optimizer_step(self, run, boundary=True):
        """run() steps the engine; on a boundary the learning rates now in the optimizer's groups
        (a torch or Hugging Face scheduler writes them there) go to the engine first, and what a
        config scheduler set comes back after. Records was_step_applied(). Returns run()'s result."""
        core, groups = self._core, self.optimizer.param_groups
        if boundary:
            core.set_lr([float(g["lr"]) for g in groups])
        skipped = core.skipped_steps
        result = run()
        self._step_applied = boundary and core.skipped_steps == skipped
        if boundary:
            _pull_lr(core, groups)
        return result

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
        if self.global_steps == 0 or not self._core.computes_grad_norm:
            return None
        return self._core.last_grad_norm

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

    @functools.cached_property
    def _parsed(self):
        """The engine's parsed config (one copy, read by the queries below)."""
        return self._core.config

    def fp16_enabled(self):
        return self._parsed.fp16_enabled

    def bfloat16_enabled(self):
        return self._parsed.bf16_enabled

    def amp_enabled(self):
        return False

    def fp16_auto_cast(self):
        return False

    def dynamic_loss_scale(self):
        return self._core.dynamic_loss_scale

    def gradient_clipping(self):
        return self._parsed.gradient_clipping

    def gradient_predivide_factor(self):
        return self._parsed.gradient_predivide_factor

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
        return self._parsed.zero_optimization.offload_optimizer_device == "cpu"

    def get_data_types(self):
        dtype = torch.float16 if self.fp16_enabled() else torch.bfloat16 if self.bfloat16_enabled() else torch.float32
        return dtype, dtype

    @property
    def communication_data_type(self):
        name = self._config.get("communication_data_type")
        names = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "bfp16": torch.bfloat16}
        return names[name] if name else self.get_data_types()[0]

    def get_type(self):
        return [group.get("type") for group in self.optimizer.param_groups]

    def checkpoint_tag_validation_enabled(self):
        return str(_config_value(self._config, ["checkpoint.tag_validation"], "Warn")).lower() != "ignore"

    def checkpoint_tag_validation_fail(self):
        return str(_config_value(self._config, ["checkpoint.tag_validation"], "Warn")).lower() == "fail"

    def get_wall_clock_timers(self):
        """Zeal logs its forward / backward / step times with wall_clock_breakdown; no timer objects."""
        return {}

    @property
    def is_compiled(self):
        return getattr(self, "_compiled", False)

    @property
    def dist_backend(self):
        return self._core.backend

    def destroy(self):
        """Closes the monitors' writers; the engine's buffers go when it is garbage-collected."""
        monitor = getattr(self, "monitor", None)
        if monitor is not None:
            monitor.close()

    def postscale_gradients(self):
        return not self._parsed.prescale_gradients

    def zero_use_cpu_optimizer(self):
        return self._parsed.zero_optimization.offload_optimizer_device in ("cpu", "nvme")

    def zero_nvme_offload_optimizer(self):
        return self._parsed.zero_optimization.offload_optimizer_device == "nvme"

    def initial_dynamic_scale(self):
        return 2 ** int((self._config.get("fp16") or {}).get("initial_scale_power", 16))

    def dynamic_loss_scale_args(self):
        fp16 = self._config.get("fp16") or {}
        if not fp16.get("enabled", False) or fp16.get("loss_scale", 0) != 0:
            return None
        return {"init_scale": self.initial_dynamic_scale(), "scale_window": fp16.get("loss_scale_window", 1000),
                "delayed_shift": fp16.get("hysteresis", 2), "consecutive_hysteresis":
                    fp16.get("consecutive_hysteresis", False), "min_scale": fp16.get("min_loss_scale", 1)}

    def get_data_parallel_rank(self):
        return self._core.rank

    def get_model_parallel_rank(self):
        group = getattr(self, "_tensor_group", None)
        return group.rank if group is not None else 0

    get_tensor_parallel_rank = get_model_parallel_rank

    @property
    def mp_world_size(self):
        group = getattr(self, "_tensor_group", None)
        return group.size if group is not None else 1

    def scale(self, loss):
        """The loss times the current loss scale, for a manual `engine.scale(loss).backward()`."""
        return loss * self._core.loss_scale

    @staticmethod
    def is_map_style_dataset(obj):
        return hasattr(obj, "__getitem__") and hasattr(obj, "__len__")

    @staticmethod
    def is_iterable_style_dataset(obj):
        return isinstance(obj, torch.utils.data.IterableDataset)

    def deepspeed_io(self, dataset, batch_size=None, route=None, pin_memory=True, data_sampler=None, collate_fn=None,
                     num_local_io_workers=None):
        """A loader over `dataset` that gives this data-parallel rank its share, in micro-batches."""
        from .data import distributed_loader

        if not (self.is_map_style_dataset(dataset) or self.is_iterable_style_dataset(dataset)):
            raise ValueError("Training data must be a torch Dataset")
        if data_sampler is not None:
            return torch.utils.data.DataLoader(dataset, batch_size=batch_size or self.train_micro_batch_size_per_gpu(),
                                               sampler=data_sampler, collate_fn=collate_fn)
        return distributed_loader(dataset, batch_size or self.train_micro_batch_size_per_gpu(), *self._sample_shard,
                                  collate_fn)

    # --- ranks and device ---
    @property
    def global_rank(self):
        """This rank in the whole world (with a data_parallel_group, not its rank in that group)."""
        return _zeal.world().rank

    @property
    def world_size(self):
        return _zeal.world().size

    def get_sequence_parallel_group(self):
        """The ranks holding one sample's sequence (the mesh's ring x sequence axes); None without
        sequence parallelism (DeepSpeed's engine has no such attribute then)."""
        return self._sequence_group

    @property
    def dp_world_size(self):
        """The ranks that hold replicas of this rank's parameters (the data-parallel group)."""
        return self._core.world_size

    @property
    def local_rank(self):
        from . import comm

        return comm.get_local_rank()


# DeepSpeed's config queries over what Zeal implements read the parsed config (config.h holds the
# defaults and the aliases): name -> zero_optimization field.
_ZERO_QUERIES = {
    "zero_reduce_scatter": "reduce_scatter", "zero_overlap_comm": "overlap_comm",
    "zero_contiguous_gradients": "contiguous_gradients", "zero_round_robin_gradients": "round_robin_gradients",
    "zero_allgather_partitions": "allgather_partitions", "zero_load_from_fp32_weights": "load_from_fp32_weights",
    "zero_elastic_checkpoint": "elastic_checkpoint", "zero_ignore_unused_parameters": "ignore_unused_parameters",
    "zero_gather_16bit_weights_on_model_save": "gather_16bit_weights_on_model_save",
    "zero_reduce_bucket_size": "reduce_bucket_size", "zero_allgather_bucket_size": "allgather_bucket_size",
    "zero_sub_group_size": "sub_group_size", "zero_max_live_parameters": "max_live_parameters",
    "zero_max_reuse_distance": "max_reuse_distance", "zero_prefetch_bucket_size": "prefetch_bucket_size",
    "zero_param_persistence_threshold": "param_persistence_threshold",
    "zero_model_persistence_threshold": "model_persistence_threshold",
    "zero_quantized_weights": "quantized_weights",
    "zero_hpz_partition_size": "hpz_partition_size",
    "zero_quantized_gradients": "quantized_gradients",
    "mics_shard_size": "mics_shard_size",
}

# The queries answered from the raw config: keys of features Zeal does not implement (so no parsed
# field holds them; they report the off value Zeal runs with), and zeropp_loco_param, whose
# DeepSpeed answer is the section as given: name -> (key paths, first found wins; DeepSpeed's default).
_CONFIG_QUERIES = {
    "zero_module_granularity_threshold": (["zero_optimization.module_granularity_threshold",
                                           "zero_optimization.stage3_module_granularity_threshold"], 0),
    "zero_quantized_nontrainable_weights": (["zero_optimization.zero_quantized_nontrainable_weights"], False),
    "zeropp_loco_param": (["zero_optimization.zeropp_loco_param"], None),
    "zero_multi_rank_bucket_allreduce": (["zero_optimization.use_multi_rank_bucket_allreduce"], True),
    "zero_allgather_sequential": (["zero_optimization.allgather_sequential",
                                   "zero_optimization.stage3_allgather_sequential"], False),
    "zero_log_trace_cache_warnings": (["zero_optimization.log_trace_cache_warnings"], False),
    "zero_save_muon_momentum_buffer_in_memory": (["zero_optimization.save_muon_momentum_buffer_in_memory"], False),
    "zero_legacy_stage1": (["zero_optimization.legacy_stage1"], False),
    "zero_grad_hooks": (["zero_optimization.grad_hooks"], True),
    "is_sanity_checks_enabled": (["zero_optimization.enable_sanity_checks"], False),
    "zero_offload_optimizer": (["zero_optimization.offload_optimizer"], None),
    "zero_offload_param": (["zero_optimization.offload_param"], None),
    "zero_partial_offload": (["zero_optimization.offload_optimizer.ratio"], 1.0),
    "super_offload": (["zero_optimization.offload_optimizer.super_offload"], False),
    "cpuadam_cores_perc": (["zero_optimization.offload_optimizer.cpuadam_cores_perc"], 0.8),
    "zenflow_config": (["zero_optimization.zenflow"], None),
    "memory_breakdown": (["memory_breakdown"], False),
    "dump_state": (["dump_state"], False),
    "log_level": (["log_level"], None),
    "sparse_gradients_enabled": (["sparse_gradients"], False),
    "dataloader_drop_last": (["dataloader_drop_last"], False),
    "graph_harvesting": (["graph_harvesting"], False),
    "managed_gradient_accumulation": (["managed_gradient_accumulation"], True),
    "optimizer_legacy_fusion": (["optimizer.legacy_fusion"], False),
    "fp16_master_weights_and_gradients": (["fp16.fp16_master_weights_and_grads"], False),
    "bf16_master_weights_and_gradients": (["bf16.bf16_master_weights_and_grads"], False),
    "bf16_optimizer_states": (["bf16.bf16_optimizer_states"], False),
    "torch_autocast_enabled": (["torch_autocast.enabled"], False),
    "torch_autocast_dtype": (["torch_autocast.dtype"], None),
    "torch_autocast_lower_precision_safe_modules": (["torch_autocast.lower_precision_safe_modules"], None),
    "amp_params": (["amp"], None),
    "pld_enabled": (["progressive_layer_drop.enabled"], False),
    "pld_params": (["progressive_layer_drop"], None),
    "eigenvalue_enabled": (["quantize_training.eigenvalue.enabled"], False),
    "autotuning_enabled": (["autotuning.enabled"], False),
    "elasticity_enabled": (["elasticity.enabled"], False),
    "data_efficiency_enabled": (["data_efficiency.enabled"], False),
    "data_efficiency_config": (["data_efficiency"], None),
    "curriculum_enabled_legacy": (["curriculum_learning.enabled"], False),
    "curriculum_params_legacy": (["curriculum_learning"], None),
    "random_ltd_enabled": (["data_efficiency.data_routing.random_ltd.enabled"], False),
    "tensor_parallel_config": (["tensor_parallel"], None),
    "autotp_size": (["tensor_parallel.autotp_size"], 0),
    "use_node_local_storage": (["checkpoint.use_node_local_storage"], False),
    "load_universal_checkpoint": (["checkpoint.load_universal"], False),
    "aio_config": (["aio"], None),
    "is_deepcompile_enabled": (["compile.deepcompile"], False),
    "pld_theta": (["progressive_layer_drop.theta"], 1.0),
    "pld_gamma": (["progressive_layer_drop.gamma"], 0.001),
    "autotuning_start_profile_step": (["autotuning.start_profile_step"], 3),
    "autotuning_end_profile_step": (["autotuning.end_profile_step"], 5),
    "autotuning_metric_path": (["autotuning.metric_path"], None),
    "autotuning_model_info_path": (["autotuning.model_info_path"], None),
    "autotuning_metric": (["autotuning.metric"], "throughput"),
    "autotuning_profile_model_info": (["autotuning.model_info.profile"], False),
    "checkpoint_serialization_enabled": (["checkpoint.checkpoint_serialization"], True),
    "checkpoint_writer_enabled": (["checkpoint.writer"], None),
    "data_sampling_enabled": (["data_efficiency.data_sampling.enabled"], False),
    "data_sampling_config": (["data_efficiency.data_sampling"], None),
    "curriculum_learning_enabled": (["data_efficiency.data_sampling.curriculum_learning.enabled"], False),
    "curriculum_learning_config": (["data_efficiency.data_sampling.curriculum_learning"], None),
    "random_ltd_config": (["data_efficiency.data_routing.random_ltd"], None),
    "swap_tensor_config": (["zero_optimization.offload_optimizer"], None),
    "quantize_training": (["quantize_training"], None),
}


def _config_value(config, paths, default):
    for path in paths:
        node, found = config, True
        for key in path.split("."):
            if isinstance(node, dict) and key in node and node[key] is not None:
                node = node[key]
            else:
                found = False
                break
        if found:
            return node
    return default


def _make_query(name, paths, default):
    def query(self):
        return _config_value(self._config, paths, default)

    query.__name__ = name
    query.__doc__ = f"DeepSpeed's {name}(): config {paths[0]} (default {default!r})."
    return query


def _make_zero_query(name, field):
    def query(self):
        return getattr(self._parsed.zero_optimization, field)

    query.__name__ = name
    query.__doc__ = f"DeepSpeed's {name}(): zero_optimization.{field}, as parsed."
    return query


for _name, (_paths, _default) in _CONFIG_QUERIES.items():
    setattr(EngineAPI, _name, _make_query(_name, _paths, _default))
for _name, _field in _ZERO_QUERIES.items():
    setattr(EngineAPI, _name, _make_zero_query(_name, _field))


def _make_profiler_query(key):
    def query(self):
        value = self._parsed.flops_profiler[key]
        return None if key == "output_file" and value == "" else value

    query.__name__ = f"flops_profiler_{key}"
    query.__doc__ = f"The parsed config's flops_profiler.{key} (DeepSpeed's query)."
    return query


for _key in ("enabled", "recompute_fwd_factor", "profile_step", "module_depth", "top_modules", "detailed",
             "output_file"):
    setattr(EngineAPI, f"flops_profiler_{_key}", _make_profiler_query(_key))


class ZealEngine(EngineAPI, torch.nn.Module):
    """Wraps the user's module. `engine(*args)` runs forward; backward() and step() as DeepSpeed."""

    def __init__(self, module: torch.nn.Module, core, config=None, optimizer=None, lr_scheduler=None,
                 client_optimizer=None, client_lr_scheduler=None, training_dataloader=None):
        super().__init__()
        self.module = module
        self._core = core
        self._config = dict(config or {})
        self.config = self._config  # DeepSpeed's engine.config: the config as a dict
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self._client_optimizer = client_optimizer
        self._client_lr_scheduler = client_lr_scheduler  # stepped after each applied step
        self.training_dataloader = training_dataloader
        self._step_applied = False
        from .monitor import MonitorMaster

        self.monitor = MonitorMaster(self._parsed.monitors, core.rank)
        profiler = self._parsed.flops_profiler
        self._flops = profiler if core.rank == 0 and profiler["enabled"] else None
        self._comms_step_bytes = self._comms_at_step = None  # comms_step_bytes()
        self.flops_profiler = None
        fp16 = self._config.get("fp16") or {}
        self._auto_cast = bool(fp16.get("enabled", False) and fp16.get("auto_cast", False))
        self._stage3 = None
        self._tensor_group = None  # the tensor-parallel group, when the model has sharded layers
        self._sample_shard = (core.rank, core.world_size)  # (share, shares) of a dataset: initialize sets it
        self._sequence_group = None  # the ranks holding one sample's sequence (ring x sequence axes)
        self.mpu = None
        if core.zero_stage == 3:
            from .zero import Stage3Hooks

            shapes = list(core.parameter_shapes) + list(core.frozen_parameter_shapes)
            for i, p in enumerate(list(core.parameters) + list(core.frozen_parameters)):
                p._zeal_engine, p._zeal_index = core, i  # frozen ones follow the trainable ones
                p.ds_shape, p.ds_numel = tuple(shapes[i]), core.param_numel(i)
                for attr in ("_zeal_chunk", "_zeal_full_shape", "_zeal_group"):
                    if hasattr(p, attr):
                        delattr(p, attr)
            self._stage3 = Stage3Hooks(module, core)
        import weakref

        # zeal.utils.safe_get_full_* find the engine through it; weak, so the model does not keep
        # the engine (and its buffers and swap files) alive.
        for i, p in enumerate(core.parameters):
            p._zeal_owner = (weakref.ref(core), i)

    @property
    def enable_backward_allreduce(self):
        return True

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
        profiling = (self._flops is not None and self.flops_profiler is None
                     and self.global_steps == self._flops["profile_step"])
        if profiling:  # rank 0 profiles the first forward of step profile_step (one micro-batch)
            from .profiling.flops_profiler import FlopsProfiler

            self.flops_profiler = FlopsProfiler(self.module, self, self._flops["recompute_fwd_factor"])
            self.flops_profiler.start_profile()
        start = time.perf_counter()
        if self._auto_cast:  # fp16.auto_cast: floating inputs to fp16, as DeepSpeed's engine
            args, kwargs = _to_half(args), _to_half(kwargs)
        if self._stage3 is None:
            out = self.module(*args, **kwargs)
        else:
            with self._stage3.saved_tensors():
                out = self.module(*args, **kwargs)
        self._core.add_forward_time(time.perf_counter() - start)
        if profiling:
            self.flops_profiler.stop_profile()
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
        boundary = self._core.is_gradient_accumulation_boundary()
        self._optimizer_step(self._core.step, boundary)
        if boundary:
            self._count_step_bytes()
        if boundary and self.flops_profiler is not None and self._flops is not None:
            record, f = self._core.last_step_record, self._flops
            self.flops_profiler.print_model_profile(
                profile_step=f["profile_step"], module_depth=f["module_depth"], top_modules=f["top_modules"],
                detailed=f["detailed"], output_file=f["output_file"] or None, fwd_latency=record["forward_ms"] / 1e3,
                bwd_latency=record["backward_ms"] / 1e3, step_latency=record["step_ms"] / 1e3)
            self.flops_profiler.end_profile()
            self._flops = None  # once
        if boundary:
            if self._step_applied and self._client_lr_scheduler is not None:
                # torch's schedulers check that their optimizer stepped first; the engine's step is it
                scheduled = getattr(self._client_lr_scheduler, "optimizer", None)
                if scheduled is not None:
                    scheduled._opt_called = True
                try:
                    self._client_lr_scheduler.step(**(lr_kwargs or {}))
                except TypeError:  # DeepSpeed's fallback for schedulers that take the sample count
                    self._client_lr_scheduler.step(self.train_batch_size())
            if self.monitor.monitors:  # rank 0, a monitor on: DeepSpeed's Train/Samples events, the lr
                from .monitor import step_events  # the schedule has moved to, as DeepSpeed writes it

                self.monitor.write_events(step_events(self._core, self.get_lr()[0], self.fp16_enabled(),
                                                     self.wall_clock_breakdown()))

    def zero_grad(self):
        self._core.zero_grad()

    def no_sync(self):
        """Backwards inside accumulate this rank's gradients without reducing them (DeepSpeed's; ZeRO
        stage 0 or 1); the first backward after it on the boundary reduces them all."""
        import contextlib

        if self.zero_optimization_stage() >= 2:
            raise RuntimeError(f"no_sync is for ZeRO stage 0 or 1 (stage {self.zero_optimization_stage()} "
                               "reduces gradients in every backward), as in DeepSpeed")

        @contextlib.contextmanager
        def held():
            self._core.set_boundary_override(0)
            try:
                yield
            finally:
                self._core.set_boundary_override(-1)

        return held()

    def save_16bit_model(self, save_dir, save_filename="pytorch_model.bin", exclude_frozen_parameters=False):
        """The module's state_dict in its training dtype, whole, written by rank 0 with torch.save
        (DeepSpeed's). At ZeRO stage 3 it gathers the parameters (every rank calls it) and, as
        DeepSpeed, only when zero_optimization.stage3_gather_16bit_weights_on_model_save is true;
        otherwise it writes nothing and returns False."""
        if self.zero_optimization_stage() == 3 and not self.zero_gather_16bit_weights_on_model_save():
            import warnings

            warnings.warn("save_16bit_model: not saved; set zero_optimization.stage3_gather_16bit_weights_on_model_save "
                          "to gather ZeRO-3 parameters (or use zeal-to-fp32 on a checkpoint)")
            return False
        state = self._consolidated_16bit_state(exclude_frozen_parameters)
        if self.global_rank == 0:
            os.makedirs(save_dir, exist_ok=True)
            torch.save(state, os.path.join(save_dir, save_filename))
        return True

    def _consolidated_16bit_state(self, exclude_frozen_parameters=False):
        """The module's state_dict whole, in its training dtype, on the CPU; at ZeRO-3 every rank
        gathers (collective). Parameters shared under two names stay one tensor."""
        state, seen = collections.OrderedDict(), {}
        for name, t in self.module.state_dict(keep_vars=True).items():
            if exclude_frozen_parameters and isinstance(t, torch.nn.Parameter) and not t.requires_grad:
                continue
            if id(t) in seen:
                state[name] = state[seen[id(t)]]
                continue
            seen[id(t)] = name
            owner = getattr(t, "_zeal_owner", None)
            if owner is not None and self.zero_optimization_stage() == 3:
                state[name] = self._core.full_value(owner[1], "fp32").to(t.dtype).cpu()
            elif self._partitioned_frozen(t):
                state[name] = self._frozen_value(t).cpu()
            else:
                state[name] = t.detach().to("cpu", copy=True)
        return state

    def _zero3_consolidated_16bit_state_dict(self, exclude_frozen_parameters=False):
        """DeepSpeed's: at ZeRO stage 3 the whole module state_dict in its training dtype, on the
        CPU, on global rank 0 and None on the others. Every rank calls it."""
        if self.zero_optimization_stage() != 3:
            raise ValueError("_zero3_consolidated_16bit_state_dict is for ZeRO stage 3 "
                             f"(this engine runs stage {self.zero_optimization_stage()})")
        state = self._consolidated_16bit_state(exclude_frozen_parameters)
        return state if self.global_rank == 0 else None

    def compile(self, backend=None, compile_kwargs=None, schedule=None, compiled_autograd_enabled=False):
        """DeepSpeed's engine.compile: the wrapped module compiled in place with torch.compile."""
        if schedule is not None or compiled_autograd_enabled:
            raise _zeal.ConfigError("engine.compile: schedule and compiled_autograd_enabled are not supported")
        kwargs = dict(compile_kwargs or {})
        if backend is not None:
            kwargs["backend"] = backend
        self.module.compile(**kwargs)
        self._compiled = True

    save_fp16_model = save_16bit_model

    def empty_partition_cache(self):
        """ZeRO-3: release every gathered parameter (DeepSpeed's; a no-op below stage 3)."""
        if self._stage3 is not None:
            self._stage3.release_all()

    # --- checkpoints (DeepSpeed's signatures) ---------------------------------------------------
    def _partitioned_frozen(self, t):
        """Whether t is a frozen parameter stage 3 partitions (Note [Frozen parameters])."""
        return getattr(t, "_zeal_engine", None) is self._core and t._zeal_index >= len(self._core.parameters)

    def _frozen_value(self, t):
        """A partitioned frozen parameter's whole value, a copy (collective: every rank calls it)."""
        i, core = t._zeal_index, self._core
        was_live = core.is_live(i)
        value = core.full_param(i)[:core.param_numel(i)].view(t.ds_shape).detach().clone()
        if not was_live:
            core.release_params([i])
        return value

    def _set_frozen(self, t, value):
        """A partitioned frozen parameter takes this whole value, every rank alike (collective)."""
        i, core = t._zeal_index, self._core
        was_live = core.is_live(i)
        with torch.no_grad():
            core.full_param(i)[:core.param_numel(i)].copy_(value.reshape(-1))
        core.absorb_parameter(i)
        if not was_live:
            core.release_params([i])

    def _extra_state(self, exclude_frozen_parameters=False, gather=True):
        """Module state the engine does not train: buffers and frozen parameters, by state_dict name.
        Frozen parameters stage 3 partitions are gathered whole (collective) or, without gather,
        given as the parameters themselves."""
        managed = {id(p) for p in self._core.parameters}
        extra = {}
        for name, t in self.module.state_dict(keep_vars=True).items():
            if id(t) in managed or not isinstance(t, torch.Tensor):
                continue
            if exclude_frozen_parameters and isinstance(t, torch.nn.Parameter):
                continue
            if self._partitioned_frozen(t):
                extra[name] = self._frozen_value(t) if gather else t
            else:
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
        # Rank 0 writes the extra state; gathering partitioned frozen parameters takes every rank.
        extra = []
        if self._core.rank == 0 or len(self._core.frozen_parameters) > 0:
            extra = sorted(self._extra_state(exclude_frozen_parameters).items())
        if self._core.rank != 0:
            extra = []
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
        _check_expert_counts(self.module, parts, path)
        _, client_json = self._core.load_checkpoint_parts(parts, load_optimizer_states, load_lr_scheduler_states,
                                                          load_module_only)
        extra = _zeal.read_checkpoint_extra(parts[0])
        if extra:
            own = self._extra_state(gather=False)
            missing = sorted(n for n in set(own) - set(extra) if not isinstance(own[n], torch.nn.Parameter))
            if missing and load_module_strict:
                raise _zeal.CheckpointError(f"checkpoint {path} lacks module state {missing}")
            with torch.no_grad():
                for name, value in extra.items():
                    if name not in own:
                        continue
                    if self._partitioned_frozen(own[name]):  # every rank reads the same extra, in order
                        self._set_frozen(own[name], value)
                    else:
                        own[name].copy_(value)
        client_state = json.loads(client_json)
        saved = client_state.pop(_CLIENT_KEY, None)
        groups_restored = False
        if saved is not None and not load_module_only:
            # The groups' hyperparameters are the user's optimizer's state, and where the user's
            # scheduler moves them (a torch scheduler keeps the current lr only in the groups), its too.
            if (load_optimizer_states and self._client_optimizer is not None) or (
                    load_lr_scheduler_states and self._client_lr_scheduler is not None):
                for group, hyper in zip(self.optimizer.param_groups, saved.get("param_groups", [])):
                    group.update({k: tuple(v) if k == "betas" else v for k, v in hyper.items()})
                    groups_restored = True
            if load_lr_scheduler_states and self._client_lr_scheduler is not None and saved.get("lr_scheduler"):
                self._client_lr_scheduler.load_state_dict(saved["lr_scheduler"])
        if not groups_restored or isinstance(self.lr_scheduler, ZealLRScheduler):
            _pull_lr(self._core, self.optimizer.param_groups)  # back with the step count
        return path, client_state

    def _client_objects_state(self):
        """What a checkpoint keeps of the user's optimizer and scheduler beyond the state tensors the
        engine saves: the groups' hyperparameters and the scheduler's state_dict, as JSON."""
        def plain(value):
            return isinstance(value, (int, float, str, bool, type(None))) or (
                isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value))

        out = {}
        if self._client_optimizer is not None or self._client_lr_scheduler is not None:
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
        """comms_logger: {op: {"calls", "bytes", "intra_node_bytes", "inter_node_bytes"}} for this
        rank since initialize (bytes: each call's input tensor; intra/inter: what this rank sends to
        peers on its node and on others, Note [Bytes within and across nodes]). With show, rank 0
        also prints a table. Empty when the config's comms_logger is off."""
        counts = self._core.comms_counts
        if show and counts and self.global_rank == 0:
            print(f"{'op':<16}{'calls':>10}{'bytes':>16}{'to this node':>16}{'to other nodes':>16}")
            for op, c in sorted(counts.items()):
                print(f"{op:<16}{c['calls']:>10}{c['bytes']:>16}{c['intra_node_bytes']:>16}{c['inter_node_bytes']:>16}")
            skipped = self._core.skipped_comm_rounds
            if skipped:
                print(f"{'(skipped rounds)':<16}{skipped:>10}{0:>16}")
        return counts

    def comms_step_bytes(self):
        """comms_logger: the bytes this rank sent during the last optimizer step's forward, backward
        and step (from the previous step() to the last), as {"intra_node": b, "inter_node": b};
        None before the first step or when comms_logger is off."""
        return self._comms_step_bytes

    def _count_step_bytes(self):
        counts = self._core.comms_counts
        if not counts:
            return
        now = (sum(c["intra_node_bytes"] for c in counts.values()), sum(c["inter_node_bytes"] for c in counts.values()))
        before = self._comms_at_step or (0, 0)
        self._comms_step_bytes = {"intra_node": now[0] - before[0], "inter_node": now[1] - before[1]}
        self._comms_at_step = now

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
    distributed_port=29500,
    mpu=None,
    dist_init_required=None,
    collate_fn=None,
    config=None,
    mesh_param=None,
    config_params=None,
    data_parallel_group=None,
    model_parallel_group=None,
):
    """DeepSpeed's initialize: returns (engine, optimizer, training_dataloader, lr_scheduler).
    distributed_port and dist_init_required are accepted and unused (ranks come from mpirun or the
    zeal launcher).

    Zeal's tensor-parallel arguments (zeal.tensor_parallel.make_groups gives both groups):
    data_parallel_group, the ranks that hold replicas of this rank's parameters (the world by
    default); model_parallel_group, the ranks that hold the other shards (the tensor group of the
    model's tensor-parallel layers by default). Both must come from the job's mesh (zeal.mesh): the
    engine takes the mesh they were cut from and derives every group from it."""
    if model is None:
        raise _zeal.ConfigError("initialize needs model=")
    mpu_groups = None
    if mesh_param is not None:  # DeepSpeed's (data, sequence) device mesh: the mesh's two axes
        from . import mesh

        try:
            dp, sp = (int(x) for x in mesh_param)
        except (TypeError, ValueError):
            raise _zeal.ConfigError(f"initialize: mesh_param= is (data parallel size, sequence parallel size), got "
                                    f"{mesh_param!r}") from None
        if dp * sp != _zeal.world().size:
            raise _zeal.ConfigError(f"initialize: mesh_param={tuple(mesh_param)} holds {dp * sp} ranks, but the world "
                                    f"has {_zeal.world().size}")
        mpu_groups = mesh.build(data=dp, sequence=sp)
    if mpu is not None:
        if not hasattr(mpu, "_zeal_mesh_groups"):
            raise _zeal.ConfigError("initialize: mpu= (a Megatron-style model-parallel unit over torch.distributed "
                                    "groups) is not supported; pass data_parallel_group= and model_parallel_group= "
                                    "(zeal.tensor_parallel.make_groups), use a zeal.pipe.PipelineModule, or for "
                                    "sequence parallelism the mpu UlyssesSPAttentionHF.register_with_transformers "
                                    "returns")
        if mpu_groups is not None and mpu._zeal_mesh_groups() is not mpu_groups:
            raise _zeal.ConfigError("initialize: mesh_param= and mpu= name different meshes; pass one")
        mpu_groups = mpu._zeal_mesh_groups()
    cfg = load_config(config, args, config_params)
    from .pipe import PipelineEngine, PipelineModule

    if isinstance(model, PipelineModule):
        if optimizer is not None or lr_scheduler is not None:
            raise _zeal.ConfigError("initialize: optimizer= and lr_scheduler= with a PipelineModule are not supported "
                                    "yet; configure config keys 'optimizer' and 'scheduler'")
        if cfg.get("sequence_parallel_size", 1) != 1 or mpu_groups is not None:
            raise _zeal.ConfigError("config key 'sequence_parallel_size': sequence parallelism with a PipelineModule "
                                    "is not supported yet")
        stage_cfg = {k: v for k, v in cfg.items() if k != "pipeline"}
        parsed = _zeal.validate_config(to_json(stage_cfg))  # serialised once, parsed once: the engine takes it
        if cfg.get("zero_optimization", {}).get("stage", 0) > 2:
            raise _zeal.ConfigError("config key 'zero_optimization.stage': pipeline parallelism works with ZeRO "
                                    f"stage 0, 1 or 2, got {cfg['zero_optimization']['stage']}")
        if _model_dtype(parsed) != torch.float32:
            model.to(_model_dtype(parsed))
        engine = PipelineEngine(model, {**stage_cfg, "pipeline": cfg.get("pipeline", {})}, parsed_config=parsed,
                                training_data=training_data, collate_fn=collate_fn)
        return engine, engine.optimizer, engine.training_dataloader, engine.lr_scheduler
    if "pipeline" in cfg:
        raise _zeal.ConfigError("config key 'pipeline': pipeline parallelism needs the model to be a "
                                "zeal.pipe.PipelineModule")
    if optimizer is not None and "optimizer" in cfg:  # DeepSpeed's rule: the client optimizer is used
        import warnings

        warnings.warn("initialize: the config has an 'optimizer' section and optimizer= is used (as DeepSpeed "
                      "does); the section is ignored")
        cfg = {k: v for k, v in cfg.items() if k != "optimizer"}
    # Serialised once and parsed once (Config::parse_text): a bad config fails here, before the
    # model is touched, and the engine takes the parsed config as it is.
    parsed = _zeal.validate_config(to_json(cfg))

    dtype = _model_dtype(parsed)
    client = torch_optimizer = None
    if optimizer is not None:
        from . import client_optim

        torch_optimizer = client_optim.build(optimizer, list(model.parameters()) if model_parameters is None
                                             else list(model_parameters))
        client_optim.check_allowed(torch_optimizer, cfg)
        model_parameters = client_optim.engine_groups(torch_optimizer)
        client = client_optim.ClientAdapter(torch_optimizer)
    if dtype != torch.float32:
        model.to(dtype)
    groups = _process_groups(model, data_parallel_group, model_parallel_group, parsed.sequence_parallel_size,
                             mpu_groups, parsed.zero_optimization.hpz_partition_size,
                             parsed.zero_optimization.mics_shard_size)
    param_groups = _param_groups(model, model_parameters, dtype, parsed.zero_optimization.stage == 3)
    _check_init_groups(param_groups, groups)
    core = _zeal.Engine(param_groups, parsed, groups, client)
    if client is not None:
        client.bind(core)

    zeal_optimizer = ZealOptimizer(core, _optimizer_groups(core, model, model_parameters), client)
    _pull_lr(core, zeal_optimizer.param_groups)
    scheduler, client_scheduler = _lr_scheduler(cfg, core, zeal_optimizer, lr_scheduler)
    loader = None
    if training_data is not None:
        from .data import distributed_loader

        loader = distributed_loader(training_data, core.train_micro_batch_size_per_gpu, *_sample_shard(groups),
                                    collate_fn)
    engine = ZealEngine(model, core, cfg, zeal_optimizer, scheduler, torch_optimizer, client_scheduler, loader)
    engine._sample_shard = _sample_shard(groups)
    engine.mpu = mpu
    if groups.mesh.size_of(["ring", "sequence"]) > 1:
        engine._sequence_group = groups.group(["ring", "sequence"])
    if groups.mesh.axis_size("tensor") > 1:
        engine._tensor_group = groups.group("tensor")
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
    """The engine's learning rates into the optimizer's groups (a config scheduler moved them); when
    the schedule cycles momentum (OneCycle), its betas too, into the groups that have betas."""
    momentum = core.cycles_momentum
    for group, lr, betas in zip(groups, core.get_lr(), core.get_betas()):
        group["lr"] = lr
        if momentum and "betas" in group:
            group["betas"] = tuple(betas)


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
