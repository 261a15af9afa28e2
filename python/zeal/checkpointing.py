"""DeepSpeed's activation checkpointing (deepspeed.checkpointing): a function's activations are
not kept for backward; its inputs are, and backward runs the function again under the same RNG
state (so dropout draws the same mask), then backpropagates through the recomputation.

What the kept inputs cost is what the `activation_checkpointing` options change:

  partition_activations   each rank of the tensor-parallel group (configure's mpu) keeps 1/t of
                          every floating input (flattened, padded to a multiple of t); backward
                          all-gathers them before recomputing. Tensor-parallel layers see the
                          same activations on every rank of the group, so nothing is lost.
  cpu_checkpointing       the kept inputs (or their partitions) live in host memory, pinned when
                          a GPU is present, and go back to the device in backward.
  contiguous_memory_optimization, number_checkpoints
                          accepted (DeepSpeed copies partitions into preallocated buffers to
                          fight fragmentation); the caching allocator does that job here.
  synchronize_checkpoint_boundary
                          synchronises the device around each checkpointed forward and backward.
  profile                 logs each checkpointed forward's and recomputation's time on rank 0.

Non-tensor and integer arguments are kept as they are. Outputs that are not floating tensors are
returned but carry no gradient. saved_bytes() says what live checkpoints hold, by place.

model_parallel_cuda_manual_seed / get_cuda_rng_tracker give Megatron's two random streams: the
default generator seeded alike on every rank of a tensor group (dropout outside tensor-parallel
regions), and a tracked "model-parallel-rng" stream seeded seed + 2718 + tensor rank, entered with
get_cuda_rng_tracker().fork(), for dropout inside them. On a host without CUDA the streams are
torch's CPU generator's.
"""
import contextlib
import logging
import time

import torch

from . import _zeal

_MODEL_PARALLEL_RNG_TRACKER_NAME = "model-parallel-rng"
_KEYS = ("partition_activations", "contiguous_memory_optimization", "cpu_checkpointing", "number_checkpoints",
         "synchronize_checkpoint_boundary", "profile")


class _Settings:
    def __init__(self):
        self.partition = False
        self.contiguous = False
        self.cpu = False
        self.num_checkpoints = None
        self.synchronize = False
        self.profile = False
        self.mpu = None
        self.group = None  # the tensor-parallel communicator partitions are cut over
        self.configured = False


_settings = _Settings()
_held = {"device": 0, "host": 0}  # bytes live checkpoints hold


def _section(deepspeed_config):
    if deepspeed_config is None:
        return {}
    from .config import load_config

    cfg = load_config(deepspeed_config)
    section = cfg.get("activation_checkpointing", {}) or {}
    if not isinstance(section, dict):
        raise _zeal.ConfigError(f"config key 'activation_checkpointing': expected an object, got {section!r}")
    for key, value in section.items():
        if key not in _KEYS:
            raise _zeal.ConfigError(f"unknown config key 'activation_checkpointing.{key}' (known: {', '.join(_KEYS)})")
        if key == "number_checkpoints":
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise _zeal.ConfigError(f"config key 'activation_checkpointing.number_checkpoints': expected an "
                                        f"integer >= 1 or null, got {value!r}")
        elif not isinstance(value, bool):
            raise _zeal.ConfigError(f"config key 'activation_checkpointing.{key}': expected a boolean, got {value!r}")
    return section


def _tensor_group(mpu):
    """The tensor-parallel communicator of DeepSpeed's mpu (Megatron's names, older ones second)."""
    for name in ("get_tensor_model_parallel_group", "get_model_parallel_group"):
        if hasattr(mpu, name):
            group = getattr(mpu, name)()
            if group is not None and not hasattr(group, "all_gather"):
                raise _zeal.ConfigError(f"activation checkpointing: mpu.{name}() must return a Zeal communicator "
                                        "(zeal.tensor_parallel.make_groups), got " + type(group).__name__)
            return group
    raise _zeal.ConfigError("activation checkpointing: the mpu has neither get_tensor_model_parallel_group nor "
                            "get_model_parallel_group")


def configure(mpu_=None, deepspeed_config=None, partition_activations=None, contiguous_checkpointing=None,
              num_checkpoints=None, checkpoint_in_cpu=None, synchronize=None, profile=None):
    """DeepSpeed's: the defaults, then the config's activation_checkpointing section, then every
    argument that is not None. mpu_ (kept from an earlier call when None) names the tensor group."""
    previous_mpu = _settings.mpu
    _settings.__init__()
    _settings.mpu = mpu_ if mpu_ is not None else previous_mpu
    section = _section(deepspeed_config)
    values = {
        "partition": section.get("partition_activations", False),
        "contiguous": section.get("contiguous_memory_optimization", False),
        "cpu": section.get("cpu_checkpointing", False),
        "num_checkpoints": section.get("number_checkpoints"),
        "synchronize": section.get("synchronize_checkpoint_boundary", False),
        "profile": section.get("profile", False),
    }
    for name, arg in (("partition", partition_activations), ("contiguous", contiguous_checkpointing),
                      ("num_checkpoints", num_checkpoints), ("cpu", checkpoint_in_cpu), ("synchronize", synchronize),
                      ("profile", profile)):
        if arg is not None:
            values[name] = arg
    for name, value in values.items():
        setattr(_settings, name, value)
    if _settings.contiguous and not _settings.partition:
        raise _zeal.ConfigError("activation checkpointing: contiguous_memory_optimization needs "
                                "partition_activations (as DeepSpeed)")
    if _settings.contiguous and _settings.num_checkpoints is None:
        raise _zeal.ConfigError("activation checkpointing: contiguous_memory_optimization needs number_checkpoints")
    if _settings.mpu is not None:
        _settings.group = _tensor_group(_settings.mpu)
    _settings.configured = True


def is_configured():
    return _settings.configured


def partition_activations_in_checkpoint(partition_activation):
    _settings.partition = bool(partition_activation)


def set_num_layers(nlayers):
    _settings.num_checkpoints = nlayers


def reset():
    """DeepSpeed frees its contiguous buffers between iterations; Zeal keeps none."""


def saved_bytes():
    """Bytes the checkpoints now alive hold for backward: {"device": ..., "host": ...}."""
    return dict(_held)


# --- the two random streams ------------------------------------------------------------------------

def _device_rng_available():
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _get_rng_state():
    return torch.cuda.get_rng_state() if _device_rng_available() else torch.get_rng_state()


def _set_rng_state(state):
    if _device_rng_available():
        torch.cuda.set_rng_state(state)
    else:
        torch.set_rng_state(state)


class CudaRNGStatesTracker:
    """Named generator states; fork(name) runs a block on that stream and keeps where it got to."""

    def __init__(self):
        self.states_ = {}
        self.seeds_ = set()

    def reset(self):
        self.states_, self.seeds_ = {}, set()

    def get_states(self):
        return {name: state.clone() for name, state in self.states_.items()}

    def set_states(self, states):
        self.states_ = {name: state.clone() for name, state in states.items()}

    def add(self, name, seed):
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"cuda rng state {name} already exists")
        self.seeds_.add(seed)
        outer = _get_rng_state()
        torch.manual_seed(seed) if not _device_rng_available() else torch.cuda.manual_seed(seed)
        self.states_[name] = _get_rng_state()
        _set_rng_state(outer)

    @contextlib.contextmanager
    def fork(self, name=_MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            raise Exception(f"cuda rng state {name} is not added")
        outer = _get_rng_state()
        _set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = _get_rng_state()
            _set_rng_state(outer)


_TRACKER = CudaRNGStatesTracker()


def get_cuda_rng_tracker():
    return _TRACKER


def model_parallel_cuda_manual_seed(seed):
    """Megatron's seeding: the default stream gets `seed` (alike on a tensor group), the tracked
    model-parallel stream seed + 2718 + this rank's tensor-parallel rank."""
    tp_rank = 0
    if _settings.mpu is not None:
        for name in ("get_tensor_model_parallel_rank", "get_model_parallel_rank"):
            if hasattr(_settings.mpu, name):
                tp_rank = getattr(_settings.mpu, name)()
                break
    elif _settings.group is not None:
        tp_rank = _settings.group.rank
    if _device_rng_available():
        torch.cuda.manual_seed(seed)
    else:
        torch.manual_seed(seed)
    _TRACKER.reset()
    _TRACKER.add(_MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)


# --- checkpoint ------------------------------------------------------------------------------------

def _checkpointable(x):
    return torch.is_tensor(x) and x.is_floating_point() and not getattr(x, "no_checkpointing", False)


class _Kept:
    """One input as a checkpoint keeps it: whole or this rank's part, on the device or the host."""

    def __init__(self, x):
        self.shape, self.dtype, self.device, self.requires_grad = x.shape, x.dtype, x.device, x.requires_grad
        self.numel = x.numel()
        data = x.detach()
        group = _settings.group if _settings.partition else None
        self.group = group if group is not None and group.size > 1 else None
        if self.group is not None:
            chunk = -(-self.numel // self.group.size)
            flat = data.reshape(-1)
            part = torch.zeros(chunk, dtype=data.dtype, device=data.device)
            start = min(self.group.rank * chunk, self.numel)
            stop = min(start + chunk, self.numel)
            part[:stop - start].copy_(flat[start:stop])
            data = part
        if _settings.cpu and data.device.type != "cpu":
            host = torch.empty(data.shape, dtype=data.dtype, pin_memory=torch.cuda.is_available())
            host.copy_(data, non_blocking=True)
            data = host
        self.data = data  # whole and on its device: a reference to the input, nothing copied
        self.place = "host" if data.device.type == "cpu" else "device"
        self.bytes = data.numel() * data.element_size()
        _held[self.place] += self.bytes

    def restore(self):
        data = self.data.to(self.device, non_blocking=True)
        if self.group is not None:
            full = data.new_empty((self.group.size, data.numel()))
            self.group.all_gather(full, data.contiguous()).wait()
            data = full.reshape(-1)[:self.numel]
        out = data.reshape(self.shape).detach()
        out.requires_grad_(self.requires_grad)
        return out

    def release(self):
        if self.data is not None:
            _held[self.place] -= self.bytes
            self.data = None


def _sync():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class CheckpointFunction(torch.autograd.Function):
    """Forward without keeping activations; backward recomputes (DeepSpeed's reentrant form)."""

    @staticmethod
    def forward(ctx, run_function, all_outputs, *args):
        if _settings.synchronize:
            _sync()
        start = time.perf_counter()
        ctx.run_function = run_function
        ctx.rng = (torch.get_rng_state(), torch.cuda.get_rng_state() if _device_rng_available() else None,
                   _TRACKER.get_states())
        with torch.no_grad():
            outputs = run_function(*args)
        ctx.kept = [_Kept(a) if _checkpointable(a) else a for a in args]
        ctx.tensor_inputs = [torch.is_tensor(a) for a in args]
        if _settings.profile:
            _log_time("checkpoint forward", start)
        if _settings.synchronize:
            _sync()
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        all_outputs += outputs
        tensors = [o for o in outputs if torch.is_tensor(o)]
        ctx.mark_non_differentiable(*[t for t in tensors if not t.is_floating_point()])
        return tuple(tensors)

    @staticmethod
    def backward(ctx, *grads):
        if not torch.autograd._is_checkpoint_valid():
            raise RuntimeError("activation checkpointing works with .backward(), not torch.autograd.grad()")
        if _settings.synchronize:
            _sync()
        start = time.perf_counter()
        inputs = []
        for item in ctx.kept:
            if isinstance(item, _Kept):
                inputs.append(item.restore())
                item.release()
            elif torch.is_tensor(item):
                inputs.append(item.detach().requires_grad_(item.requires_grad))
            else:
                inputs.append(item)
        ctx.kept = None
        cpu_now, device_now, tracker_now = (torch.get_rng_state(),
                                            torch.cuda.get_rng_state() if _device_rng_available() else None,
                                            _TRACKER.get_states())
        cpu_then, device_then, tracker_then = ctx.rng
        torch.set_rng_state(cpu_then)
        if device_then is not None:
            torch.cuda.set_rng_state(device_then)
        _TRACKER.set_states(tracker_then)
        try:
            with torch.enable_grad():
                outputs = ctx.run_function(*inputs)
        finally:
            torch.set_rng_state(cpu_now)
            if device_now is not None:
                torch.cuda.set_rng_state(device_now)
            _TRACKER.set_states(tracker_now)
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        pairs = [(o, g) for o, g in zip([o for o in outputs if torch.is_tensor(o)], grads)
                 if o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        if _settings.profile:
            _log_time("checkpoint recompute + backward", start)
        if _settings.synchronize:
            _sync()
        return (None, None, *[x.grad if is_t and torch.is_tensor(x) else None
                              for x, is_t in zip(inputs, ctx.tensor_inputs)])


def _log_time(what, start):
    if _zeal.world().rank == 0:
        logging.getLogger("zeal").info(f"{what}: {(time.perf_counter() - start) * 1e3:.2f} ms")


def checkpoint(function, *args, **kwargs):
    """function(*args, **kwargs) with its activations recomputed in backward. Returns what the
    function returns (non-tensor outputs included), as DeepSpeed's."""
    if kwargs:
        names = list(kwargs)
        positional = len(args)

        def run(*all_args):
            return function(*all_args[:positional], **dict(zip(names, all_args[positional:])))

        return checkpoint(run, *args, *[kwargs[n] for n in names])
    all_outputs = []
    # Note [Checkpoint outputs always need grad]: an autograd.Function's outputs need grad only if
    # an input does, and the function's parameters are not inputs. With no input needing grad
    # (the first layer's), DeepSpeed's checkpoint returns outputs without grad and the layer's
    # parameters silently get none; a grad-requiring empty tensor passed along prevents that.
    anchor = torch.empty(0, requires_grad=torch.is_grad_enabled())
    anchor.no_checkpointing = True
    CheckpointFunction.apply(lambda _anchor, *a: function(*a), all_outputs, anchor, *args)
    if len(all_outputs) == 1:
        return all_outputs[0]
    return tuple(all_outputs)


def non_reentrant_checkpoint(function, *args):
    """torch's non-reentrant checkpoint (DeepSpeed's non_reentrant_checkpoint)."""
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)
