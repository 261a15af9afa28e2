"""DeepSpeed's FLOPs profiler (deepspeed.profiling.flops_profiler) for Zeal: per-module parameters,
MACs, FLOPs and forward latency of one forward pass, printed under DeepSpeed's labels.

Counting works as DeepSpeed's does. While profiling, the torch functions that carry the work
(torch.nn.functional.linear, conv*, the norms, activations, pools, softmax, embedding,
scaled_dot_product_attention; torch/Tensor matmul, mm, bmm, addmm, baddbmm, mul, add, einsum;
einops.einsum) are replaced by wrappers that estimate (flops, macs) from the argument shapes and
credit them to the innermost hooked module that is running; every module gets a forward pre-hook
and a forward hook that keep that stack and time the module. A module's figure is the sum over its
subtree (get_module_flops). stop_profile and end_profile put torch's own functions back.

Only the multiply-accumulate ops (linear, matmul family, conv, SDPA) have MACs, and for them
flops = 2 * MACs plus the bias or input add DeepSpeed counts for conv, addmm and baddbmm.
get_total_matmul_flops (2 * MACs, no bias terms) is therefore what
torch.utils.flop_counter.FlopCounterMode counts for a model built of those ops; embeddings are
0 in both. einsum has FLOPs but no MACs, as in DeepSpeed.

Where this differs from DeepSpeed's, on purpose:
  - a patched function that calls another (F.upsample calls F.interpolate) counts once;
  - matmul counts broadcast batch dimensions and vector operands by the product's real size;
  - interpolate with `size` counts the output's elements (DeepSpeed: prod(size) alone);
  - "params of model" is params per GPU times mp_size (1 without an engine; DeepSpeed prints 0);
  - the aggregated profile with module_depth=-1 includes the innermost depth;
  - a zero latency gives 0 FLOPS instead of ZeroDivisionError; an op whose rule cannot read its
    arguments counts 0 (logged once) instead of failing the forward.

Zeal's engine has no DeepSpeed timer objects, so print_model_profile takes the engine's forward,
backward and step latencies as numbers (fwd_latency, bwd_latency, step_latency, seconds); the
bwd/step lines are printed when both of the latter are known. This module does not import the
compiled extension, so it loads beside any Zeal build.
"""
import contextlib
import functools
import logging
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

logger = logging.getLogger("zeal")

DEFAULT_PRECISION = 2

# DeepSpeed's timer names, read from an engine that has DeepSpeed's timers.
_FORWARD_TIMER, _BACKWARD_TIMER, _STEP_TIMER = "fwd", "bwd", "step"

# One entry per running hooked module: [module, start time, [(op, flops, macs), ...]].
_frames = []
# The replaced functions, to put back: (owner, name, original, owner held it itself).
_saved = []
# >0 while a counted call runs, so what it calls through other patched functions is not counted again.
_inside = 0
_warned = set()


# --- formatting ----------------------------------------------------------------------------------
_SCALES = (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3), ("", 1.0), ("m", 1e-3), ("u", 1e-6))


def number_to_string(num, units=None, precision=DEFAULT_PRECISION):
    """`num` scaled to a unit prefix, with a space before the (possibly empty) unit: '1.05 K', '12 '."""
    if units is None:
        units, scale = "u", 1e-6
        if num == 0:
            units, scale = "", 1.0
        else:
            for prefix, size in _SCALES:
                if num >= size:
                    units, scale = prefix, size
                    break
    else:
        scale = dict(_SCALES).get(units, 1.0) if units else 1.0
    return f"{round(num / scale, precision):g} {units}"


def macs_to_string(macs, units=None, precision=DEFAULT_PRECISION):
    return number_to_string(macs, units, precision) + "MACs"


def flops_to_string(flops, units=None, precision=DEFAULT_PRECISION):
    return number_to_string(flops, units, precision) + "FLOPS"


def bytes_to_string(b, units=None, precision=DEFAULT_PRECISION):
    return number_to_string(b, units, precision) + "B"


def duration_to_string(duration, units=None, precision=DEFAULT_PRECISION):
    return number_to_string(duration, units, precision) + "s"


def params_to_string(params_num, units=None, precision=DEFAULT_PRECISION):
    """Billions as 'B' rather than 'G', no trailing space: '7.1 B', '12'."""
    units = units.replace("B", "G") if units else units
    return number_to_string(params_num, units, precision).replace("G", "B").strip()


# --- module totals (valid between start_profile and end_profile) --------------------------------
def get_module_flops(module):
    """FLOPs of the module's subtree; a module shared by two parents is counted once."""
    return sum(m.__flops__ for m in module.modules())


def get_module_macs(module):
    return sum(m.__macs__ for m in module.modules())


def get_module_duration(module):
    """The module's own forward time, or its children's sum when it never ran itself (ModuleList)."""
    duration = module.__duration__
    if duration == 0:
        duration = sum(get_module_duration(child) for child in module.children())
    return duration


# --- counting rules: each returns (flops, macs) from the call's arguments ------------------------
def _prod(values):
    n = 1
    for v in values:
        n *= int(v)
    return n


def _pick(args, kwargs, index, *names):
    if len(args) > index:
        return args[index]
    for name in names:
        if name in kwargs:
            return kwargs[name]
    return None


def _per_element(*args, **kwargs):
    return _pick(args, kwargs, 0, "input", "self").numel(), 0


def _linear(input, weight, bias=None):
    macs = input.numel() * weight.shape[0]
    return 2 * macs, macs


def _spatial(input, weight):
    """(batch, channels, spatial dims) of a conv input, batched or not."""
    shape = tuple(input.shape)
    if len(shape) == weight.dim() - 1:
        shape = (1, *shape)
    return shape[0], shape[1], shape[2:]


def _per_dim(value, n):
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def _conv(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    batch, in_channels, in_dims = _spatial(input, weight)
    kernel, n = weight.shape[2:], weight.dim() - 2
    strides, dilations = _per_dim(stride, n), _per_dim(dilation, n)
    if padding == "same":
        out_dims = in_dims
    else:
        pads = (0,) * n if padding == "valid" else _per_dim(padding, n)
        out_dims = [(size + 2 * p - (d * (k - 1) + 1)) // s + 1
                    for size, p, d, k, s in zip(in_dims, pads, dilations, kernel, strides)]
    positions = batch * _prod(out_dims)
    out_channels = weight.shape[0]
    macs = _prod(kernel) * in_channels * (out_channels // groups) * positions
    return 2 * macs + (out_channels * positions if bias is not None else 0), macs


def _conv_transpose(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    batch, in_channels, in_dims = _spatial(input, weight)
    kernel, n = weight.shape[2:], weight.dim() - 2
    filters = weight.shape[1]  # already per group: the weight is [in, out // groups, *kernel]
    macs = _prod(kernel) * in_channels * filters * batch * _prod(in_dims)
    flops = 2 * macs
    if bias is not None:
        out_dims = [(size - 1) * s - 2 * p + d * (k - 1) + op + 1
                    for size, s, p, d, k, op in zip(in_dims, _per_dim(stride, n), _per_dim(padding, n),
                                                    _per_dim(dilation, n), kernel, _per_dim(output_padding, n))]
        flops += filters * groups * batch * _prod(out_dims)
    return flops, macs


def _batch_norm(input, running_mean=None, running_var=None, weight=None, bias=None, training=False, *args, **kwargs):
    if training:
        return input.numel() * (5 if weight is not None else 4), 0
    return input.numel() * (2 if weight is not None else 1), 0


def _norm_with_weight(weight_index):
    def rule(*args, **kwargs):
        weight = _pick(args, kwargs, weight_index, "weight")
        return _pick(args, kwargs, 0, "input").numel() * (5 if weight is not None else 4), 0
    return rule


def _prod_float(values):
    n = 1.0
    for v in values:
        n *= v
    return n


def _interpolate(input, size=None, scale_factor=None, *args, **kwargs):
    lead = input.numel() // _prod(input.shape[2:]) if input.dim() > 2 else input.numel()
    if size is not None:
        spatial = _prod(size) if isinstance(size, (tuple, list)) else int(size) ** (input.dim() - 2)
        return lead * spatial, 0
    if scale_factor is None:
        raise ValueError("interpolate needs size or scale_factor")
    if isinstance(scale_factor, (tuple, list)):
        return int(input.numel() * _prod_float(scale_factor)), 0
    return int(input.numel() * scale_factor ** (input.dim() - 2)), 0


def _nothing(*args, **kwargs):
    return 0, 0


def _sdpa(query, key, value, *args, **kwargs):
    keys = key.shape[-2]
    macs = _prod(query.shape) * keys + _prod(query.shape[:-1]) * keys * value.shape[-1]
    return 2 * macs, macs


def _matmul_macs(a, b):
    if a.dim() == 1 and b.dim() == 1:
        return a.shape[0]
    a_shape = tuple(a.shape) if a.dim() > 1 else (1, a.shape[0])
    b_shape = tuple(b.shape) if b.dim() > 1 else (b.shape[0], 1)
    batch = torch.broadcast_shapes(a_shape[:-2], b_shape[:-2])
    return _prod(batch) * a_shape[-2] * a_shape[-1] * b_shape[-1]


def _matmul(*args, **kwargs):
    a = _pick(args, kwargs, 0, "input", "self")
    b = _pick(args, kwargs, 1, "other", "mat2")
    macs = _matmul_macs(a, b)
    return 2 * macs, macs


def _addmm(*args, **kwargs):
    """addmm and baddbmm: the product's MACs plus one add per element of the added tensor."""
    added = _pick(args, kwargs, 0, "input", "self")
    first = _pick(args, kwargs, 1, "mat1", "batch1")
    second = _pick(args, kwargs, 2, "mat2", "batch2")
    macs = _prod(first.shape) * second.shape[-1]
    return 2 * macs + added.numel(), macs


def _elementwise(*args, **kwargs):
    a = _pick(args, kwargs, 0, "input", "self")
    b = _pick(args, kwargs, 1, "other")
    a_tensor, b_tensor = torch.is_tensor(a), torch.is_tensor(b)
    if a_tensor and b_tensor:
        return _prod(torch.broadcast_shapes(a.shape, b.shape)), 0
    if a_tensor or b_tensor:
        return (a if a_tensor else b).numel(), 0
    return 1, 0


def _einsum_path_flops(equation, shapes):
    import numpy as np

    views = [np.broadcast_to(np.zeros(()), shape) for shape in shapes]  # shapes alone, no memory
    report = np.einsum_path(equation, *views, optimize="optimal")[1]
    for line in report.splitlines():
        if "optimized flop" in line.lower():
            return int(float(line.split(":")[-1]))
    raise ValueError(f"numpy gave no flop count for einsum {equation!r}")


def _einsum(equation, *operands):
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = operands[0]
    return _einsum_path_flops(equation.replace(" ", ""), [tuple(o.shape) for o in operands]), 0


def _einops_einsum(*args):
    *operands, pattern = args
    letters = {}

    def term(axes):
        out = ""
        for axis in axes.split():
            if axis == "...":
                out += "..."
            else:
                out += letters.setdefault(axis, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"[len(letters)])
        return out

    inputs, output = pattern.split("->")
    equation = ",".join(term(t) for t in inputs.split(",")) + "->" + term(output)
    return _einsum_path_flops(equation, [tuple(o.shape) for o in operands]), 0


def _functional_rules():
    rules = {"linear": _linear, "softmax": _per_element, "embedding": _nothing,
             "batch_norm": _batch_norm, "layer_norm": _norm_with_weight(2), "group_norm": _norm_with_weight(2),
             "instance_norm": _norm_with_weight(3), "upsample": _interpolate, "interpolate": _interpolate,
             "scaled_dot_product_attention": _sdpa}
    for n in (1, 2, 3):
        rules[f"conv{n}d"] = _conv
        rules[f"conv_transpose{n}d"] = _conv_transpose
        for pool in ("avg_pool", "max_pool", "adaptive_avg_pool", "adaptive_max_pool"):
            rules[f"{pool}{n}d"] = _per_element
    for name in ("relu", "prelu", "elu", "leaky_relu", "relu6", "silu", "gelu"):
        rules[name] = _per_element
    return rules


def _patch_targets():
    targets = [(F, name, rule) for name, rule in _functional_rules().items() if hasattr(F, name)]
    for owner in (torch, torch.Tensor):
        targets += [(owner, "matmul", _matmul), (owner, "mm", _matmul), (owner, "bmm", _matmul),
                    (owner, "addmm", _addmm), (owner, "baddbmm", _addmm),
                    (owner, "mul", _elementwise), (owner, "add", _elementwise)]
    targets += [(torch.Tensor, "__matmul__", _matmul), (torch, "einsum", _einsum)]
    einops = sys.modules.get("einops")  # a model that calls einops.einsum has imported it
    if einops is not None and hasattr(einops, "einsum"):
        targets.append((einops, "einsum", _einops_einsum))
    return targets


def _counted(op, original, rule):
    @functools.wraps(original)
    def call(*args, **kwargs):
        global _inside
        if _inside or not _frames:
            return original(*args, **kwargs)
        try:
            flops, macs = rule(*args, **kwargs)
        except Exception as e:  # the profiler must not fail the forward it measures
            if op not in _warned:
                _warned.add(op)
                logger.warning(f"flops profiler: {op} counted as 0 ({type(e).__name__}: {e})")
            flops, macs = 0, 0
        _frames[-1][2].append((op, int(flops), int(macs)))
        _inside += 1
        try:
            return original(*args, **kwargs)
        finally:
            _inside -= 1
    return call


def _patch():
    if _saved:
        return
    for owner, name, rule in _patch_targets():
        original = getattr(owner, name)
        _saved.append((owner, name, original, name in vars(owner)))
        label = "torch.Tensor" if owner is torch.Tensor else owner.__name__
        setattr(owner, name, _counted(f"{label}.{name}", original, rule))


def _restore():
    global _inside
    while _saved:
        owner, name, original, owned = _saved.pop()
        if owned:
            setattr(owner, name, original)
        else:
            delattr(owner, name)  # inherited (TensorBase's methods): uncover it again
    _inside = 0


def _synchronize():
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


# --- RNN modules: analytic count, added by a forward hook (their kernels are not patched) ---------
def _rnn_step_flops(rnn, w_ih, w_hh):
    gates, h = w_ih.shape[0], rnn.hidden_size
    flops = 2 * w_ih.shape[0] * w_ih.shape[1] - gates + 2 * w_hh.shape[0] * w_hh.shape[1] - gates
    if isinstance(rnn, (nn.RNN, nn.RNNCell)):
        flops += h
    elif isinstance(rnn, (nn.GRU, nn.GRUCell)):
        flops += 7 * h  # r hadamard, the gates' adds, the final hadamards and add
    elif isinstance(rnn, (nn.LSTM, nn.LSTMCell)):
        flops += 10 * h
    return flops


def _rnn_hook(rnn, inputs, output):
    flops = 0
    for layer in range(rnn.num_layers):
        flops += _rnn_step_flops(rnn, getattr(rnn, f"weight_ih_l{layer}"), getattr(rnn, f"weight_hh_l{layer}"))
        if rnn.bias:
            flops += getattr(rnn, f"bias_ih_l{layer}").shape[0] + getattr(rnn, f"bias_hh_l{layer}").shape[0]
    x = inputs[0]
    if isinstance(x, nn.utils.rnn.PackedSequence):
        steps = x.data.shape[0]
    else:
        steps = x.shape[0] * x.shape[1] if x.dim() == 3 else x.shape[0]
    flops *= steps * (2 if rnn.bidirectional else 1)
    rnn.__flops__ += int(flops)


def _rnn_cell_hook(cell, inputs, output):
    flops = _rnn_step_flops(cell, cell.weight_ih, cell.weight_hh)
    if cell.bias:
        flops += cell.bias_ih.shape[0] + cell.bias_hh.shape[0]
    x = inputs[0]
    cell.__flops__ += int(flops * (x.shape[0] if x.dim() == 2 else 1))


MODULE_HOOK_MAPPING = {nn.RNN: _rnn_hook, nn.GRU: _rnn_hook, nn.LSTM: _rnn_hook,
                       nn.RNNCell: _rnn_cell_hook, nn.LSTMCell: _rnn_cell_hook, nn.GRUCell: _rnn_cell_hook}

_ATTRS = ("__flops__", "__macs__", "__params__", "__expert_params__", "__model_expert_params__",
          "__start_time__", "__duration__")


def _ratio(a, b):
    return a / b if b else 0


def _percent(part, total):
    return round(100 * part / total, DEFAULT_PRECISION) if total else 0


class FlopsProfiler:
    """Profiles the forwards of `model` between start_profile and stop_profile (DeepSpeed's API).

        prof = FlopsProfiler(model)
        prof.start_profile()
        loss = model(batch)
        prof.print_model_profile(profile_step=step)
        prof.end_profile()

    One profiler at a time: the patched torch functions are process-wide.
    """

    def __init__(self, model, ds_engine=None, recompute_fwd_factor=0.0):
        self.model = model
        self.ds_engine = ds_engine
        self.recompute_fwd_factor = recompute_fwd_factor
        self.started = False
        self.func_patched = False
        self._hooks = []
        self._by_op = {}

    # --- lifecycle ---
    def start_profile(self, ignore_list=None):
        """Resets the counters, patches torch's functions and hooks every module. Modules whose
        type is in ignore_list get no hooks; what they compute is credited to their hooked parent."""
        logger.info("Flops profiler started")
        self._remove_hooks()
        self.reset_profile()
        _patch()
        _frames.clear()
        self.started = self.func_patched = True  # from here stop_profile restores torch
        ignored = tuple(ignore_list or ())
        for module in self.model.modules():
            if type(module) in ignored:
                continue
            if type(module) in MODULE_HOOK_MAPPING:
                self._hooks.append(module.register_forward_hook(MODULE_HOOK_MAPPING[type(module)]))
                continue
            self._hooks.append(module.register_forward_pre_hook(self._enter))
            self._hooks.append(module.register_forward_hook(self._leave, always_call=True))

    def stop_profile(self):
        """Puts torch's functions back and removes the hooks; the counters stay readable."""
        if self.started and self.func_patched:
            _restore()
            self.func_patched = False
        self._remove_hooks()
        _frames.clear()

    def reset_profile(self):
        """Zeroes every module's counters and recounts its parameters (the subtree's, each once;
        a parameter whose group_name is 'ep_size_<N>' is an expert parameter, N copies in the model)."""
        self._by_op = {}
        for module in self.model.modules():
            module.__flops__ = module.__macs__ = 0
            module.__params__ = module.__expert_params__ = module.__model_expert_params__ = 0
            for p in module.parameters():
                copies = _expert_copies(p)
                if copies:
                    module.__expert_params__ += p.numel()
                    module.__model_expert_params__ += p.numel() * copies
                else:
                    module.__params__ += p.numel()
            module.__start_time__ = 0
            module.__duration__ = 0

    def end_profile(self):
        """stop_profile, then removes the counters from the modules."""
        if not self.started:
            return
        self.stop_profile()
        self.started = False
        for module in self.model.modules():
            for attr in _ATTRS:
                if attr in module.__dict__:
                    delattr(module, attr)
        logger.info("Flops profiler finished")

    def _remove_hooks(self):
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _enter(self, module, args):
        _synchronize()
        module.__start_time__ = time.perf_counter()
        _frames.append([module, module.__start_time__, []])

    def _leave(self, module, args, output):
        if not _frames or _frames[-1][0] is not module:
            return  # its pre-hook did not run (hooked while it was already running)
        _, start, calls = _frames.pop()
        _synchronize()
        module.__duration__ += time.perf_counter() - start
        for op, flops, macs in calls:
            module.__flops__ += flops
            module.__macs__ += macs
            total = self._by_op.setdefault(op, [0, 0])
            total[0] += flops
            total[1] += macs

    # --- totals ---
    def get_total_flops(self, as_string=False):
        total = get_module_flops(self.model)
        return number_to_string(total) if as_string else total

    def get_total_macs(self, as_string=False):
        total = get_module_macs(self.model)
        return macs_to_string(total) if as_string else total

    def get_total_duration(self, as_string=False):
        total = get_module_duration(self.model)
        return duration_to_string(total) if as_string else total

    def get_total_params(self, as_string=False):
        total = self.model.__expert_params__ + self.model.__params__
        return params_to_string(total) if as_string else total

    def get_total_matmul_flops(self, as_string=False):
        """2 * MACs: the FLOPs of linear, matmul/bmm/addmm/baddbmm, conv and SDPA without the bias
        and add terms, i.e. what torch.utils.flop_counter.FlopCounterMode counts for them."""
        total = 2 * self.get_total_macs()
        return number_to_string(total) if as_string else total

    def get_flops_by_op(self):
        """{op: (flops, macs)} over the profiled forwards, e.g. 'torch.nn.functional.linear'.
        RNN modules' analytic counts are not ops and are not listed."""
        return {op: tuple(v) for op, v in self._by_op.items()}

    def is_expert_tensor_parallelism_enabled(self):
        for module in self.model.modules():
            if hasattr(module, "enable_expert_tensor_parallelism"):
                return module.enable_expert_tensor_parallelism
        return False

    # --- printing ---
    def print_model_profile(self, profile_step=1, module_depth=-1, top_modules=1, detailed=True, output_file=None,
                            fwd_latency=None, bwd_latency=None, step_latency=None):
        """Prints DeepSpeed's summary, aggregated and detailed profile to stdout, or to output_file.
        The latencies (seconds) default to the engine's DeepSpeed timers when it has them, and the
        forward one to the modules' own timing."""
        if not self.started:
            return
        if output_file:
            os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
            with open(output_file, "w") as out:
                self._print_profile(out, profile_step, module_depth, top_modules, detailed,
                                    fwd_latency, bwd_latency, step_latency)
        else:
            self._print_profile(sys.stdout, profile_step, module_depth, top_modules, detailed,
                                fwd_latency, bwd_latency, step_latency)

    def print_model_aggregated_profile(self, module_depth=-1, top_modules=1):
        """For each depth, the top_modules module classes by params, MACs and forward latency."""
        self._print_aggregated(sys.stdout, module_depth, top_modules)

    def _engine_latency(self, timer):
        engine = self.ds_engine
        timers = getattr(engine, "timers", None)
        if engine is None or not callable(timers) or not engine.wall_clock_breakdown():
            return None
        return timers(timer).elapsed(False) / 1000.0

    def _print_profile(self, out, profile_step, module_depth, top_modules, detailed,
                       fwd_latency, bwd_latency, step_latency):
        def say(*text):
            print(*text, file=out)

        def line(label, value):
            say(f"{label:<70}  {value!s:<8}")

        engine = self.ds_engine
        total_flops, total_macs = self.get_total_flops(), self.get_total_macs()
        total_duration, total_params = self.get_total_duration(), self.get_total_params()
        self.flops, self.macs, self.params = total_flops, total_macs, total_params
        mp_size = engine.mp_world_size if engine is not None else 1
        has_moe = bool(getattr(engine, "has_moe_layers", False))
        expert_tp = mp_size if has_moe and self.is_expert_tensor_parallelism_enabled() else 1
        model_params = self.model.__params__ * mp_size
        model_expert_params = self.model.__model_expert_params__ * expert_tp if has_moe else 0

        say("\n" + "-" * 26 + " DeepSpeed Flops Profiler " + "-" * 26)
        say(f"Profile Summary at step {profile_step}:")
        say("Notations:\n"
            "data parallel size (dp_size), model parallel size(mp_size),\n"
            "number of parameters (params), number of multiply-accumulate operations(MACs),\n"
            "number of floating-point operations (flops), floating-point operations per second (FLOPS),\n"
            "fwd latency (forward propagation latency), bwd latency (backward propagation latency),\n"
            "step (weights update latency), iter latency (sum of fwd, bwd and step latency)\n")
        if engine is not None:
            dp_size = engine.dp_world_size
            if dp_size is None:
                dp_size = engine.seq_dp_world_size
            line("world size: ", engine.world_size)
            line("data parallel size: ", dp_size)
            line("model parallel size: ", mp_size)
            line("batch size per GPU: ", engine.train_micro_batch_size_per_gpu())
            if has_moe:
                line("expert tensor parallelism enabled: ", expert_tp > 1)
        line("params per GPU: ", params_to_string(total_params))
        if model_expert_params > 0:
            line("params of model: ", params_to_string(model_params + model_expert_params))
            line("   non-expert params of model: ", params_to_string(model_params))
            line("   expert params of model: ", params_to_string(model_expert_params))
        else:
            line("params of model = params per GPU * mp_size: ", params_to_string(model_params))
        line("fwd MACs per GPU: ", macs_to_string(total_macs))
        line("fwd flops per GPU: ", number_to_string(total_flops))
        line("fwd flops of model = fwd flops per GPU * mp_size: ", number_to_string(total_flops * mp_size))

        if fwd_latency is None:
            fwd_latency = self._engine_latency(_FORWARD_TIMER)
        if fwd_latency is None:
            fwd_latency = total_duration
        line("fwd latency: ", duration_to_string(fwd_latency))
        line("fwd FLOPS per GPU = fwd flops per GPU / fwd latency: ",
             flops_to_string(_ratio(total_flops, fwd_latency)))

        if bwd_latency is None:
            bwd_latency = self._engine_latency(_BACKWARD_TIMER)
        if step_latency is None:
            step_latency = self._engine_latency(_STEP_TIMER)
        if bwd_latency is not None and step_latency is not None:
            bwd_factor = 2 + self.recompute_fwd_factor
            iter_latency = fwd_latency + bwd_latency + step_latency
            line("bwd latency: ", duration_to_string(bwd_latency))
            line(f"bwd FLOPS per GPU = {bwd_factor:g} * fwd flops per GPU / bwd latency: ",
                 flops_to_string(_ratio(bwd_factor * total_flops, bwd_latency)))
            line(f"fwd+bwd FLOPS per GPU = {bwd_factor + 1:g} * fwd flops per GPU / (fwd+bwd latency): ",
                 flops_to_string(_ratio((bwd_factor + 1) * total_flops, fwd_latency + bwd_latency)))
            line("step latency: ", duration_to_string(step_latency))
            line("iter latency: ", duration_to_string(iter_latency))
            line(f"FLOPS per GPU = {bwd_factor + 1:g} * fwd flops per GPU / iter latency: ",
                 flops_to_string(_ratio((bwd_factor + 1) * total_flops, iter_latency)))
            if engine is not None:
                samples = engine.train_micro_batch_size_per_gpu() * engine.world_size
                line("samples/second: ", round(_ratio(samples, iter_latency), DEFAULT_PRECISION))

        say("\n" + "-" * 29 + " Aggregated Profile per GPU " + "-" * 29)
        self._print_aggregated(out, module_depth, top_modules)

        if detailed:
            say("\n" + "-" * 30 + " Detailed Profile per GPU " + "-" * 30)
            say("Each module profile is listed after its name in the following order: \n"
                "params, percentage of total params, MACs, percentage of total MACs, fwd latency, "
                "percentage of total fwd latency, fwd FLOPS")
            say("\nNote: 1. MACs and latency of a module include its submodules and any functionals it calls "
                "itself (a loss, a residual matmul); such calls are not listed as submodules, so a parent's "
                "figures can exceed the sum of its children's.\n"
                "2. FLOPs are estimated from the operands' shapes, so FLOPS derived from them can exceed what "
                "the hardware delivers.\n"
                "3. The top module's latency is timed around its forward call alone, so it is below the fwd "
                "latency above when that comes from the engine's timer.\n")
            with self._annotated_reprs(total_params, total_macs, total_duration):
                say(self.model)
        say("-" * 78)

    def _print_aggregated(self, out, module_depth, top_modules):
        if not hasattr(self.model, "__flops__"):
            print("no __flops__ attribute in the model, call this function after start_profile and before end_profile",
                  file=out)
            return
        levels = []  # per depth: {class name: [macs, params, duration]}

        def walk(module, depth):
            if depth == len(levels):
                levels.append({})
            totals = levels[depth].setdefault(type(module).__name__, [0, 0, 0])
            totals[0] += get_module_macs(module)
            totals[1] += module.__params__ + module.__expert_params__
            totals[2] += get_module_duration(module)
            for child in module.children():
                walk(child, depth + 1)

        walk(self.model, 0)
        depths = len(levels) if module_depth == -1 else min(module_depth, len(levels))
        print(f"Top {top_modules} modules in terms of params, MACs or fwd latency at different model depths:", file=out)
        for d in range(depths):
            n = min(top_modules, len(levels[d]))

            def top(index, fmt):
                ranked = sorted(levels[d].items(), key=lambda item: item[1][index], reverse=True)[:n]
                return {name: fmt(values[index]) for name, values in ranked}

            print(f"depth {d}:", file=out)
            print(f"    params      - {top(1, params_to_string)}", file=out)
            print(f"    MACs        - {top(0, macs_to_string)}", file=out)
            print(f"    fwd latency - {top(2, duration_to_string)}", file=out)

    @contextlib.contextmanager
    def _annotated_reprs(self, total_params, total_macs, total_duration):
        """Every module's extra_repr prefixed with its profile while the model is printed."""
        def annotate(module, original):
            params = module.__params__ + module.__expert_params__
            macs, duration = get_module_macs(module), get_module_duration(module)
            flops = round(get_module_flops(module) / duration, DEFAULT_PRECISION) if duration else 0
            items = [f"{params_to_string(params)} = {_percent(params, total_params):g}% Params",
                     f"{macs_to_string(macs)} = {_percent(macs, total_macs):g}% MACs",
                     f"{duration_to_string(duration)} = {_percent(duration, total_duration):g}% latency",
                     flops_to_string(flops)]
            extra = original()
            return ", ".join(items + [extra] if extra else items)

        replaced = []
        try:
            for module in self.model.modules():
                replaced.append((module, module.__dict__.get("extra_repr")))
                module.extra_repr = functools.partial(annotate, module, module.extra_repr)
            yield
        finally:
            for module, own in replaced:
                if own is None:
                    del module.extra_repr
                else:
                    module.extra_repr = own


def _expert_copies(param):
    name = getattr(param, "group_name", None) or ""
    if not name.startswith("ep_size_"):
        return 0
    try:
        return int(name[len("ep_size_"):])
    except ValueError:
        return 0


def get_model_profile(model, input_shape=None, args=(), kwargs=None, print_profile=True, detailed=True, module_depth=-1,
                      top_modules=1, warm_up=1, as_string=True, output_file=None, ignore_modules=None, mode="forward"):
    """(flops, macs, params) of one forward (or generate) of `model`, after `warm_up` unprofiled
    ones; the model is left in eval mode. With input_shape the model gets one uninitialised tensor
    of that shape, the first parameter's dtype and device. As strings, the flops carry no unit
    suffix: ('1.2 G', '600 MMACs', '7.1 M')."""
    if not isinstance(model, nn.Module):
        raise TypeError("model must be a torch.nn.Module")
    if mode not in ("forward", "generate"):
        raise ValueError(f"mode must be 'forward' or 'generate', not {mode!r}")
    kwargs = kwargs or {}
    prof = FlopsProfiler(model)
    model.eval()
    if input_shape is not None:
        if not isinstance(input_shape, tuple) or not input_shape:
            raise ValueError("input_shape must be a non-empty tuple")
        first = next(model.parameters(), None)
        if first is None:
            args = [torch.empty(input_shape)]
        else:
            args = [torch.empty(input_shape, dtype=first.dtype, device=first.device)]
    if not args and not kwargs:
        raise ValueError("give input_shape, args or kwargs for the model's forward")
    run = model.generate if mode == "generate" else model

    logger.info("Flops profiler warming-up...")
    for _ in range(warm_up):
        run(*args, **kwargs)
    try:
        prof.start_profile(ignore_list=ignore_modules)
        run(*args, **kwargs)
        flops, macs, params = prof.get_total_flops(), prof.get_total_macs(), prof.get_total_params()
        if print_profile:
            prof.print_model_profile(profile_step=warm_up, module_depth=module_depth, top_modules=top_modules,
                                     detailed=detailed, output_file=output_file)
    finally:
        prof.end_profile()
    if as_string:
        return number_to_string(flops), macs_to_string(macs), params_to_string(params)
    return flops, macs, params
