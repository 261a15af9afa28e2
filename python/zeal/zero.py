"""ZeRO stage 3 on the Python side: the module hooks that gather parameters around their use,
zero.Init (partition while the model is built) and GatheredParameters.

The C++ engine owns the partition (zeal/zero/param_partition.h) and the agreement protocol that
keeps ranks in step (Note [Stage 3 agreement]); this module only decides *when* to ask:

  forward   a module's pre-hook gathers its own parameters (plus any registered as external to
            it) and prefetches the next ones along the previous forward's trace; its post-hook
            releases them unless the trace says they are reused soon (max_reuse_distance).
  backward  autograd's saved tensors that are views of a gathered parameter are stored as
            (parameter, view geometry) instead of the tensor; unpacking gathers the parameter
            again. The engine releases each parameter once its gradient has been consumed; a frozen
            one (Note [Frozen parameters]) is released as soon as it is unpacked.
"""

import weakref

import torch

from . import _zeal



def _chunk(numel, world):
    return (numel + world - 1) // world


_stage3_of = weakref.WeakKeyDictionary()  # module -> the Stage3Hooks of the engine that holds it


def stage3_of(module):
    """The ZeRO-3 hooks of the engine training `module`, or None (not ZeRO-3, not an engine's)."""
    return _stage3_of.get(module)


class Stage3Hooks:
    """Installed by zeal.initialize on every submodule when zero_optimization.stage is 3."""

    def __init__(self, module, core):
        self.core = core
        # trainable parameters, then the frozen ones stage 3 partitions (Note [Frozen parameters])
        self.index = {id(p): i for i, p in enumerate(list(core.parameters) + list(core.frozen_parameters))}
        self.trainable = len(core.parameters)
        settings = core.zero3_settings
        self.prefetch_bucket_size = settings["prefetch_bucket_size"]
        self.max_live = settings["max_live_parameters"]
        self.max_reuse = settings["max_reuse_distance"]
        self.numel = [core.param_numel(i) for i in range(len(self.index))]
        self.trace, self.recording, self.trusted = [], [], False
        self.next_use = []  # per trace position: {param: elements fetched before its next use}
        self.position = 0
        self.depth = 0
        # backward: the order unpacking asked for parameters, recorded the same way
        self.bw_trace, self.bw_recording, self.bw_position, self.bw_trusted = [], [], 0, False
        self.handles = []
        self.module_params = {}
        inside_leaf = set()  # submodules of a ZeRO-3 leaf (zeal.utils.set_z3_leaf_modules): no hooks
        for m in module.modules():
            if m in inside_leaf:
                continue
            leaf = getattr(m, "_z3_leaf", False)
            params = m.parameters(recurse=leaf)
            own = [self.index[id(p)] for p in params if id(p) in self.index]
            subtree = m.modules() if leaf else (m,)
            for sub in subtree:
                own += [self.index[id(p)] for p in getattr(sub, "_zeal_external_params", []) if id(p) in self.index]
                if sub is not m:
                    inside_leaf.add(sub)
            self.module_params[m] = tuple(sorted(set(own)))
            self.handles.append(m.register_forward_pre_hook(self._pre))
            self.handles.append(m.register_forward_hook(self._post))
            _stage3_of[m] = self

    def remove(self):
        for h in self.handles:
            h.remove()

    def gather(self, params):
        """Gathers these of the engine's parameters (whole until released): a computation that takes
        parameters as autograd inputs outside their module's forward (zeal.sequence.ulysses_sp's tiles)
        must see their whole shapes. Returns what release() takes."""
        held = [self.index[id(p)] for p in params if id(p) in self.index]
        if held:
            self.core.fetch_params(held)
        return held

    def release(self, held):
        held = [i for i in held if not self.core.is_persistent(i)]
        if held:
            self.core.release_params(held)

    def release_all(self):
        """Releases every gathered parameter but the persistent ones (engine.empty_partition_cache)."""
        live = [i for i in range(len(self.numel)) if self.core.is_live(i) and not self.core.is_persistent(i)]
        if live:
            self.core.release_params(live)

    # --- forward -------------------------------------------------------------------------------
    def _pre(self, module, args):
        if self.depth == 0:
            # A new forward: prefetch only along a trace every rank recorded alike.
            self.trusted = bool(self.trace) and not self.core.take_fallback_flag()
            self.recording, self.position = [], 0
        self.depth += 1
        wanted = self.module_params.get(module, ())
        if not wanted:
            return
        self.core.fetch_params(list(wanted))
        if self.trusted:
            if self.position < len(self.trace) and self.trace[self.position] == wanted:
                self._prefetch(self.position + 1)
            else:
                self.trusted = False  # this forward left the trace; stop predicting
        self.recording.append(wanted)
        self.position += 1

    def _prefetch(self, start, trace=None):
        budget, chosen = self.prefetch_bucket_size, []
        live = self.core.live_elements
        for entry in (self.trace if trace is None else trace)[start:]:
            for i in entry:
                if self.core.is_persistent(i) or self.core.is_live(i) or i in chosen:
                    continue
                if self.numel[i] > budget or live + self.numel[i] > self.max_live:
                    budget = -1
                    break
                chosen.append(i)
                budget -= self.numel[i]
                live += self.numel[i]
            if budget < 0:
                break
        if chosen:
            self.core.prefetch_params(chosen)

    def _post(self, module, args, output):
        self.depth -= 1
        wanted = self.module_params.get(module, ())
        if wanted:
            pos = self.position - 1
            keep = self.next_use[pos] if self.trusted and pos < len(self.next_use) else {}
            release = [i for i in wanted
                       if not (i in keep and keep[i] <= self.max_reuse
                               and self.core.live_elements <= self.max_live)]
            if release:
                self.core.release_params(release)
        if self.depth == 0:
            self.core.end_forward()
            self._finish_trace()

    def _finish_trace(self):
        self.trace = self.recording
        # Reuse distance: elements fetched between a module and the next use of each of its parameters.
        self.next_use = [dict() for _ in self.trace]
        last_seen, fetched = {}, 0
        cumulative = []
        for pos, entry in enumerate(self.trace):
            cumulative.append(fetched)
            for i in entry:
                if i in last_seen:
                    prev = last_seen[i]
                    self.next_use[prev][i] = fetched - cumulative[prev] - sum(self.numel[j] for j in self.trace[prev])
                last_seen[i] = pos
            fetched += sum(self.numel[i] for i in entry)

    # --- backward ------------------------------------------------------------------------------
    def pack(self, tensor):
        i = self.core.saved_param_index(tensor)
        if i < 0:
            return tensor
        return (i, tensor.size(), tensor.stride(), tensor.storage_offset())

    def unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        i, size, stride, offset = packed
        was_live = self.core.is_live(i)
        full = self.core.full_param(i)  # the agreement check comes first, as in forward
        if not was_live and not self.core.in_fallback:
            # Prefetch along the previous backward's order while this one follows it: every rank
            # recorded the same trace and has agreed on every gather so far.
            if self.bw_trusted:
                pos = self.bw_position
                if pos < len(self.bw_trace) and self.bw_trace[pos] == (i,):
                    self._prefetch(pos + 1, self.bw_trace)
                else:
                    self.bw_trusted = False
            self.bw_recording.append((i,))
            self.bw_position += 1
        view = full.as_strided(size, stride, offset)
        if i >= self.trainable and not was_live and not self.core.is_persistent(i):
            # A frozen parameter has no gradient whose accumulation would release it: released now,
            # its storage lives on in this view until autograd has used it.
            self.core.release_params([i])
        return view

    def begin_backward(self):
        self.bw_trusted = bool(self.bw_trace) and self.trusted
        self.bw_recording, self.bw_position = [], 0

    def end_backward(self):
        self.bw_trace = self.bw_recording

    def saved_tensors(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


def register_external_parameter(module, parameter):
    """Gather `parameter` around `module`'s forward too (a parameter of another module that this
    module's forward uses directly, as DeepSpeed's register_external_parameter)."""
    if not isinstance(parameter, torch.nn.Parameter):
        raise RuntimeError("register_external_parameter: the parameter must be a torch.nn.Parameter "
                           f"(got {type(parameter).__name__})")
    if not hasattr(module, "_zeal_external_params"):
        module._zeal_external_params = []
    module._zeal_external_params.append(parameter)


# --- zero.Init ---------------------------------------------------------------------------------

import itertools  # noqa: E402

from .accelerator import get_accelerator  # noqa: E402,F401  (DeepSpeed's partition_parameters has it)

_ds_ids = itertools.count()
_orig_torch_arange = torch.arange  # DeepSpeed's name for the constructor before any wrapping


def zero_wrapper_for_fp_tensor_constructor(fn, target_fp_dtype, target_device=None):
    """DeepSpeed's: `fn` (a torch tensor constructor) made to put floating tensors in
    target_fp_dtype on target_device. zero.Init builds parameters with torch's own constructors, so
    Zeal never installs it; transformers wraps it around model construction and needs it here."""
    def wrapped(*args, **kwargs):
        if kwargs.get("device") is None and target_device is not None:
            kwargs["device"] = target_device
        tensor = fn(*args, **kwargs)
        if tensor.is_floating_point() and target_fp_dtype is not None:
            tensor = tensor.to(target_fp_dtype)
        return tensor

    return wrapped


def _config_dtype(cfg):
    """The parameter dtype a config trains in (bf16.enabled, fp16.enabled, else fp32), as DeepSpeed's
    zero.Init reads it. A value that is not plainly true (Hugging Face's unfilled "auto") is off."""
    if not isinstance(cfg, dict):
        return None
    for key, dtype in (("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16), ("fp16", torch.float16)):
        section = cfg.get(key)
        if isinstance(section, dict) and section.get("enabled") is True:
            return dtype
    return None

def _partition_group(data_parallel_group):
    """The group zero.Init partitions over: the world, or a group one of this job's meshes cut (the
    group the engine will reduce and partition those parameters over: zeal.mesh.build(...).group(...))."""
    from . import mesh, world
    if data_parallel_group is None:
        return world()
    if mesh.ranks_of(data_parallel_group) is None:
        raise _zeal.ConfigError("zeal.zero.Init: data_parallel_group= must be the world or a group a Zeal mesh cut "
                                "(zeal.mesh.build(...).group('data'), zeal.tensor_parallel.make_groups); got "
                                f"{data_parallel_group!r}")
    return data_parallel_group


def _group_root(group, rank):
    """A world rank's index in `group` (the root a broadcast over it names), or an error."""
    from . import mesh
    ranks = mesh.ranks_of(group)
    if ranks is None or rank not in ranks:
        raise _zeal.ConfigError(f"GatheredParameters: modifier_rank={rank} is not a rank of the group the parameter "
                                f"is partitioned over (world ranks {ranks})")
    return ranks.index(rank)


def _partition_parameter(param, comm):
    """Replace a whole parameter by this rank's chunk of the group's first rank's value (kept on the
    parameter, with the group)."""
    world, rank = comm.size, comm.rank
    numel = param.numel()
    c = _chunk(numel, world)
    full = torch.zeros(c * world, dtype=param.dtype, device=param.device)
    full[:numel].copy_(param.detach().reshape(-1))
    if world > 1:
        comm.broadcast(full, 0).wait()
    param._zeal_full_shape = tuple(param.shape)
    param._zeal_chunk = full[rank * c:(rank + 1) * c].clone()
    param._zeal_group = comm
    param.ds_shape = param._zeal_full_shape  # DeepSpeed's attribute names
    param.ds_numel = numel
    param.ds_id = next(_ds_ids)
    param.data = torch.empty(0, dtype=param.dtype, device=param.device)


class Init:
    """Partition parameters as modules are constructed, so a model larger than one rank's memory
    can be built. Each module's parameters are whole only inside its own __init__; when it
    returns they are cut to this rank's chunk (of the first rank's values) over data_parallel_group
    (the world by default; on a mesh, the group the engine will reduce them over, which it checks).
    Use as a context manager:

        with zeal.zero.Init(config_dict_or_path=config):
            model = MyModel()
    """

    def __init__(self, module=None, data_parallel_group=None, config_dict_or_path=None, config=None,
                 enabled=True, dtype=None, remote_device=None, pin_memory=False, mpu=None):
        if remote_device not in (None, "none"):
            raise _zeal.ConfigError("zeal.zero.Init: remote_device (offload) is not supported yet")
        if mpu is not None:
            raise _zeal.ConfigError("zeal.zero.Init: mpu is not supported; pass data_parallel_group= (a group a Zeal "
                                    "mesh cut, e.g. zeal.mesh.build(sequence=2).group(['data', 'sequence']))")
        self.group = _partition_group(data_parallel_group)
        self.enabled = enabled
        self.dtype = dtype
        self._patched = []
        cfg = config_dict_or_path if config_dict_or_path is not None else config
        if cfg is not None:
            # The gathers below honour the config's comms_timeout_s (Note [One comms timeout]). Only
            # these keys are read: a config Hugging Face has not finished filling ("auto") is fine.
            from .config import load_config
            cfg = load_config(cfg)
            if self.dtype is None:
                self.dtype = _config_dtype(cfg)
            timeout = cfg.get("comms_timeout_s")
            if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0:
                _zeal.set_default_timeout(float(timeout))
        if module is not None and enabled:
            self._partition_module(module)

    def _partition_module(self, module):
        comm = self.group
        for p in module.parameters(recurse=False):
            if not hasattr(p, "_zeal_chunk") and p.numel() > 0:
                if self.dtype is not None and p.is_floating_point():
                    p.data = p.data.to(self.dtype)
                _partition_parameter(p, comm)
        for child in module.children():
            self._partition_module(child)

    def __enter__(self):
        if not self.enabled:
            return self
        init = self

        def wrap(cls):
            original = cls.__dict__.get("__init__")
            if original is None:
                return

            def __init__(module, *args, **kwargs):
                original(module, *args, **kwargs)
                # Only the outermost object's class partitions (a subclass calling super().__init__
                # must still be able to touch its parameters afterwards).
                if type(module).__init__ is __init__ or type(module) is cls:
                    init._partition_module(module)

            cls.__init__ = __init__
            self._patched.append((cls, original))

        def subclasses(cls):
            for sub in cls.__subclasses__():
                yield sub
                yield from subclasses(sub)

        for cls in set(subclasses(torch.nn.Module)):
            wrap(cls)
        return self

    def __exit__(self, *exc):
        for cls, original in reversed(self._patched):
            cls.__init__ = original
        self._patched.clear()
        return False


class GatheredParameters:
    """Gather partitioned parameters whole for the duration of the block. With modifier_rank set,
    that rank's values are broadcast on exit and re-partitioned (e.g. custom initialisation).

    `params` is one tensor or any iterable of them; entries that are not partitioned (None, buffers,
    plain parameters) are passed over, and with none left the block does nothing, as DeepSpeed's.
    Blocks may nest over the same parameters (transformers' weight initialisation does): an inner
    block finds them gathered and, on exit, only broadcasts modifier_rank's values; the outermost
    block re-partitions."""

    def __init__(self, params, modifier_rank=None, fwd_module=None, enabled=True):
        if isinstance(params, torch.Tensor) or params is None:
            params = [params]
        self.params = [p for p in params
                       if isinstance(p, torch.Tensor) and (hasattr(p, "_zeal_chunk") or hasattr(p, "_zeal_engine"))]
        self.modifier_rank = modifier_rank
        self.enabled = enabled and bool(self.params)
        if fwd_module is not None:
            for p in self.params:
                register_external_parameter(fwd_module, p)

    def __enter__(self):
        if not self.enabled:
            return self
        for p in self.params:
            depth = getattr(p, "_zeal_gather_depth", 0)
            p._zeal_gather_depth = depth + 1
            if depth:
                continue  # an outer block holds it whole
            if hasattr(p, "_zeal_engine"):
                p._zeal_engine.fetch_params([p._zeal_index])
            else:
                comm, chunk = p._zeal_group, p._zeal_chunk
                full = torch.empty(chunk.numel() * comm.size, dtype=chunk.dtype, device=chunk.device)
                if comm.size > 1:
                    comm.all_gather(full, chunk).wait()
                else:
                    full.copy_(chunk)
                numel = 1
                for d in p._zeal_full_shape:
                    numel *= d
                p.data = full[:numel].view(p._zeal_full_shape)
        return self

    def __exit__(self, *exc):
        if not self.enabled:
            return False
        for p in self.params:
            p._zeal_gather_depth -= 1
            engine = getattr(p, "_zeal_engine", None)
            # The group the parameter is partitioned over: its engine unit's, or zero.Init's.
            comm = engine.param_group(p._zeal_index) if engine is not None else p._zeal_group
            if self.modifier_rank is not None:
                # Every rank takes modifier_rank's values now; the outermost block keeps them.
                root = _group_root(comm, self.modifier_rank)
                if engine is not None:
                    full = engine.full_param(p._zeal_index)
                    if comm.size > 1:
                        comm.broadcast(full, root).wait()
                else:
                    full = torch.zeros(p._zeal_chunk.numel() * comm.size, dtype=p.dtype, device=p.device)
                    full[:p.numel()].copy_(p.detach().reshape(-1))
                    if comm.size > 1:
                        comm.broadcast(full, root).wait()
                    with torch.no_grad():
                        p.data.copy_(full[:p.numel()].view(p._zeal_full_shape))
                p._zeal_gather_modified = True
            if p._zeal_gather_depth:
                continue
            modified = getattr(p, "_zeal_gather_modified", False)
            p._zeal_gather_modified = False
            if engine is not None:
                if modified:
                    engine.absorb_parameter(p._zeal_index)
                engine.release_params([p._zeal_index])
            else:
                if modified:
                    c = p._zeal_chunk.numel()
                    full = torch.zeros(c * comm.size, dtype=p.dtype, device=p.device)
                    full[:p.numel()].copy_(p.detach().reshape(-1))
                    p._zeal_chunk = full[comm.rank * c:(comm.rank + 1) * c].clone()
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        return False
