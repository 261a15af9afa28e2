"""Pipeline parallelism with DeepSpeed's API: PipelineModule, LayerSpec, and the engine that runs a
pipeline schedule (zeal/parallel/schedule.h) for one global batch.

Threading and ordering: one Python thread per rank runs its stage's instruction list in order.
Sends are posted without waiting (their Work handles are kept, and the tensors with them, until
the batch ends); receives block. The schedules guarantee that along every channel sends and
receives come in the same order, so this cannot deadlock. The optimizer step, whose gradient norm
is summed across the stages, comes after every stage has posted its last send.

Layout: ranks form a mesh (pipe, data[, tensor]), pipe outermost, as DeepSpeed's
PipeDataParallelTopology: rank = stage * data_size + data_index (zeal.mesh; every group below is
cut from it once). Each stage's parameters train in a Zeal engine over its data-parallel group;
the stages exchange activations and gradients point to point.
"""
import collections
import functools
import json
import os
import re
import time

import torch

from . import _zeal, mesh
from .engine import EngineAPI

# Message kinds: the tag of a point-to-point message (shape messages: _SHAPE + kind).
_ACTIVATION, _GRADIENT, _SHAPE = 0, 1, 2
_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32]


class LayerSpec:
    """A layer to build later, on the stage that owns it: typename(*module_args, **module_kwargs)."""

    def __init__(self, typename, *module_args, **module_kwargs):
        if not (isinstance(typename, type) and issubclass(typename, torch.nn.Module)):
            raise TypeError(f"LayerSpec needs a torch.nn.Module subclass, got {typename!r}")
        self.typename, self.module_args, self.module_kwargs = typename, module_args, module_kwargs

    def build(self):
        return self.typename(*self.module_args, **self.module_kwargs)

    def __repr__(self):
        return f"LayerSpec({self.typename.__name__})"


class TiedLayerSpec(LayerSpec):
    """A layer whose module is shared by every TiedLayerSpec of the same key, on whatever stages
    they fall (DeepSpeed's: an embedding reused as the output head). The first occurrence's spec
    builds it; forward_fn(module, x), when given, is how an occurrence applies it. Stages that hold
    the same key keep identical copies: built from the same seed, their gradients summed across
    those stages before every step."""

    def __init__(self, key, typename, *module_args, forward_fn=None, tied_weight_attr="weight", **module_kwargs):
        super().__init__(typename, *module_args, **module_kwargs)
        self.key, self.forward_fn, self.tied_weight_attr = key, forward_fn, tied_weight_attr


def partition_uniform(num_items, num_parts):
    """Boundaries of num_parts contiguous parts of num_items items, sizes differing by at most one
    (the first parts take the remainder)."""
    base, extra = divmod(num_items, num_parts)
    bounds = [0]
    for part in range(num_parts):
        bounds.append(bounds[-1] + base + (1 if part < extra else 0))
    return bounds


def partition_balanced(weights, num_parts):
    """Boundaries of num_parts contiguous, non-empty parts of `weights` whose heaviest part is as
    light as possible (exact, by dynamic programming); ties go to the earliest cut."""
    n = len(weights)
    if n < num_parts:
        raise ValueError(f"{n} layers cannot fill {num_parts} stages")
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    inf = float("inf")
    # best[k][i]: the lightest heaviest part when the first i items form k parts; cut[k][i]: where.
    best = [[inf] * (n + 1) for _ in range(num_parts + 1)]
    cut = [[0] * (n + 1) for _ in range(num_parts + 1)]
    best[0][0] = 0
    for k in range(1, num_parts + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                if cost < best[k][i]:
                    best[k][i], cut[k][i] = cost, j
    bounds = [n]
    for k in range(num_parts, 0, -1):
        bounds.append(cut[k][bounds[-1]])
    return bounds[::-1]


def _layer_weight(layer, method):
    if method == "parameters":
        if isinstance(layer, LayerSpec):
            with torch.device("meta"):
                layer = layer.build()
        if isinstance(layer, torch.nn.Module):
            return sum(p.numel() for p in layer.parameters() if p.requires_grad)
        return 0
    pattern = method[len("type:"):]
    name = layer.typename.__name__ if isinstance(layer, LayerSpec) else type(layer).__name__
    return 1 if re.search(pattern, name, re.IGNORECASE) else 0


def partition_layers(layers, num_stages, method="parameters"):
    """Stage boundaries over `layers` for DeepSpeed's partition_method: "uniform" (layer counts),
    "parameters" (trainable parameter counts), or "type:regex" (layers whose class name matches)."""
    method = method.lower() if not method.lower().startswith("type:") else method
    if method == "uniform":
        return partition_uniform(len(layers), num_stages)
    if method != "parameters" and not method.startswith("type:"):
        raise ValueError(f"partition_method {method!r}: expected 'parameters', 'uniform' or 'type:<regex>'")
    weights = [_layer_weight(layer, method) for layer in layers]
    if method.startswith("type:") and not any(weights):
        raise ValueError(f"partition_method {method!r}: no layer's class name matches")
    return partition_balanced(weights, num_stages)


class PipelineModule(torch.nn.Module):
    """The layers of a sequential model, cut into num_stages stages; each rank builds its stage's.

    layers: LayerSpec, torch.nn.Module or plain callables, applied in order. loss_fn(outputs,
    labels) gives the last stage's loss. seed_layers (default True here, False in DeepSpeed): layer
    i is built after torch.manual_seed(base_seed + i), so the weights are the same whatever the
    number of stages. activation_checkpoint_interval: recompute every that many layers in backward.
    chunks_per_stage (Zeal's, for the interleaved schedule): the layers are cut into num_stages x
    chunks_per_stage parts and stage s holds parts s, num_stages + s, ... (its chunks 0, 1, ...).
    """

    def __init__(self, layers, num_stages=None, topology=None, loss_fn=None, seed_layers=True, base_seed=1234,
                 partition_method="parameters", activation_checkpoint_interval=0, chunks_per_stage=1, world=None):
        super().__init__()
        if isinstance(layers, torch.nn.Sequential):
            layers = list(layers)
        layers = list(layers)
        if not layers:
            raise ValueError("PipelineModule needs at least one layer")
        world = world or _zeal.world()
        size = world.size
        if topology is None:
            if not num_stages or size % num_stages:
                raise ValueError(f"PipelineModule: num_stages ({num_stages}) must divide the world size ({size})")
            topology = _zeal.Mesh.with_sizes(pipe=num_stages, data=size // num_stages)
        self.topology = topology  # a zeal._zeal.Mesh (DeepSpeed's name for it)
        self.process_groups = mesh.of(topology, world)  # collective: every rank builds the module
        self.world = world
        self.global_rank = world.rank
        self.num_stages = topology.axis_size("pipe")
        pipe_group = topology.group_of("pipe", world.rank)
        self.stage_id = pipe_group.index(world.rank)
        self.chunks_per_stage = chunks_per_stage
        parts = self.num_stages * chunks_per_stage
        if len(layers) < parts:
            raise ValueError(f"PipelineModule: {len(layers)} layers cannot fill {parts} pipeline parts")
        self.loss_fn = loss_fn
        self.activation_checkpoint_interval = activation_checkpoint_interval
        self.parts = partition_layers(layers, parts, partition_method)
        self._chunk_funcs = []
        self.stage_layers = torch.nn.ModuleList()  # every chunk's untied modules, chunk by chunk
        self.tied_modules = torch.nn.ModuleDict()  # key -> the module its TiedLayerSpecs share
        self.chunk_layers = []                     # (first, end) layer index of each chunk
        self._layer_index = []                     # the layer index of each stage_layers entry
        first_of_key = {}
        self.tied_stages = {}                      # key -> the stages holding it
        for index, layer in enumerate(layers):
            if isinstance(layer, TiedLayerSpec):
                first_of_key.setdefault(layer.key, index)
                part = next(k for k in range(parts) if self.parts[k] <= index < self.parts[k + 1])
                self.tied_stages.setdefault(layer.key, set()).add(part % self.num_stages)
        for chunk in range(chunks_per_stage):
            part = chunk * self.num_stages + self.stage_id
            begin, end = self.parts[part], self.parts[part + 1]
            self.chunk_layers.append((begin, end))
            funcs = []
            for index in range(begin, end):
                layer = layers[index]
                if isinstance(layer, TiedLayerSpec):
                    if layer.key not in self.tied_modules:
                        first = layers[first_of_key[layer.key]]
                        if seed_layers:
                            torch.manual_seed(base_seed + first_of_key[layer.key])
                        self.tied_modules[layer.key] = first.build()
                    module = self.tied_modules[layer.key]
                    funcs.append(functools.partial(layer.forward_fn, module) if layer.forward_fn else module)
                    continue
                if isinstance(layer, LayerSpec):
                    if seed_layers:
                        torch.manual_seed(base_seed + index)
                    layer = layer.build()
                if isinstance(layer, torch.nn.Module):
                    self.stage_layers.append(layer)
                    self._layer_index.append(index)
                elif not callable(layer):
                    raise TypeError(f"layer {index} is neither a LayerSpec, a Module nor callable: {layer!r}")
                funcs.append(layer)
            self._chunk_funcs.append(funcs)

    def is_first_stage(self):
        return self.stage_id == 0

    def is_last_stage(self):
        return self.stage_id == self.num_stages - 1

    def parameter_names(self):
        """Names for self.parameters(), in order, that do not depend on the layout: "layer<i>.<name>"
        for layer i's parameters, "tied.<key>.<name>" for a tied module's. Checkpoints use them, so a
        checkpoint saved with one number of stages loads with another."""
        names = [f"layer{index}.{name}" for module, index in zip(self.stage_layers, self._layer_index)
                 for name, _ in module.named_parameters()]
        names += [f"tied.{key}.{name}" for key, module in self.tied_modules.items() for name, _ in module.named_parameters()]
        return names

    def forward(self, x, chunk=0):
        funcs = self._chunk_funcs[chunk]
        interval = self.activation_checkpoint_interval
        if not interval or not torch.is_grad_enabled():
            for f in funcs:
                x = f(x)
            return x
        for start in range(0, len(funcs), interval):
            def run(y, part=funcs[start:start + interval]):
                for f in part:
                    y = f(y)
                return y
            x = torch.utils.checkpoint.checkpoint(run, x, use_reentrant=False)
        return x


class PipelineParallelGrid:
    """DeepSpeed's PipelineParallelGrid (engine.grid, engine.mpu) over a PipelineModule's topology:
    the ranks, axis coordinates and groups pipeline scripts ask for (to pick their data shard, for
    example). Groups are Zeal communicators. "Model parallel" is every axis but data (pipe x
    tensor), "slice parallel" the tensor axis, as in DeepSpeed."""

    def __init__(self, topology, rank, pipe_comm, data_comm, model_comm):
        self._topo = topology
        self.global_rank = rank
        self.world_size = topology.world_size
        self.pipe_parallel_size = topology.axis_size("pipe")
        self.data_parallel_size = topology.axis_size("data")
        self.slice_parallel_size = topology.axis_size("tensor")
        self.model_parallel_size = self.slice_parallel_size
        self.pp_group = topology.group_of("pipe", rank)
        self.dp_group = topology.group_of("data", rank)
        self.stage_id = self.pp_group.index(rank)
        self.data_parallel_id = self.dp_group.index(rank)
        self.is_first_stage = self.stage_id == 0
        self.is_last_stage = self.stage_id == self.pipe_parallel_size - 1
        self._pipe_comm, self._data_comm, self._model_comm = pipe_comm, data_comm, model_comm

    def topology(self):
        return self._topo

    def get_global_rank(self):
        return self.global_rank

    def get_stage_id(self):
        return self.stage_id

    def get_pipe_parallel_rank(self):
        return self.stage_id

    get_pipeline_model_parallel_rank = get_pipe_parallel_rank

    def get_pipe_parallel_world_size(self):
        return self.pipe_parallel_size

    get_pipeline_model_parallel_world_size = get_pipe_parallel_world_size

    def get_pipe_parallel_group(self):
        return self._pipe_comm

    def get_data_parallel_id(self):
        return self.data_parallel_id

    def get_data_parallel_rank(self):
        return self.data_parallel_id

    def get_data_parallel_world_size(self):
        return self.data_parallel_size

    def get_data_parallel_group(self):
        return self._data_comm

    def get_data_parallel_group_ranks(self):
        return list(self.dp_group)

    def get_model_parallel_rank(self):
        return self._model_comm.rank

    def get_model_parallel_world_size(self):
        return self._model_comm.size

    def get_model_parallel_group(self):
        return self._model_comm

    def get_slice_parallel_rank(self):
        try:
            group = self._topo.group_of("tensor", self.global_rank)
        except _zeal.Error:
            return 0
        return group.index(self.global_rank)

    get_tensor_model_parallel_rank = get_slice_parallel_rank

    def get_slice_parallel_world_size(self):
        return self.slice_parallel_size

    get_tensor_model_parallel_world_size = get_slice_parallel_world_size

    def stage_to_global(self, stage_id, **kwargs):
        """The global rank at pipeline stage stage_id with this rank's other coordinates."""
        return self.pp_group[stage_id]


class PipelineEngine(EngineAPI):
    """What zeal.initialize returns for a PipelineModule: train_batch / eval_batch over one global
    batch of gradient_accumulation_steps micro-batches, with the schedule of config key
    pipeline.schedule: "1f1b" (the default), "fill_drain", or "interleaved" (the default for a
    PipelineModule with chunks_per_stage > 1)."""

    def __init__(self, module, config, model_parameters=None, parsed_config=None, training_data=None,
                 collate_fn=None):
        self.module = module
        self.config = dict(config)
        self._config = self.config
        topology, world = module.topology, module.world
        rank = world.rank
        self.stage_id, self.num_stages = module.stage_id, module.num_stages
        pipe_group = topology.group_of("pipe", rank)
        data_group = topology.group_of("data", rank)
        groups = module.process_groups
        self.pipe_comm = groups.group("pipe")
        self.data_comm = groups.group("data")
        # The point-to-point messages get a communicator of their own (world ranks, world order):
        # a mesh group may be the world itself (a mesh of one axis), and a send queued behind the
        # step's norm all-reduce on the same communicator would wait for it on every stage.
        self.p2p_comm = groups.custom("pipe:p2p", list(range(world.size)))
        self.pipe_group = pipe_group
        self.chunks = module.chunks_per_stage
        pipeline = self.config.pop("pipeline", {}) or {}
        self.schedule_kind = pipeline.get("schedule", "interleaved" if self.chunks > 1 else "1f1b")
        if self.schedule_kind not in ("1f1b", "fill_drain", "interleaved"):
            raise _zeal.ConfigError(f"config key 'pipeline.schedule': expected \"1f1b\", \"fill_drain\" or "
                                    f"\"interleaved\", got {json.dumps(self.schedule_kind)}")
        if (self.schedule_kind == "interleaved") != (self.chunks > 1):
            raise _zeal.ConfigError(f"config key 'pipeline.schedule': {json.dumps(self.schedule_kind)} with a "
                                    f"PipelineModule of chunks_per_stage={self.chunks} (interleaved needs more than one "
                                    "chunk per stage, the others exactly one)")
        self.timeout_s = float(self.config.get("comms_timeout_s", _zeal.DEFAULT_COMMS_TIMEOUT_S))
        _zeal.set_default_timeout(self.timeout_s)  # the groups cut above follow it (Note [One comms timeout])
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"pipeline stage {self.stage_id} has no trainable parameters")
        self.device_ = params[0].device  # received activations and gradients are allocated here
        names = [n for n, p in zip(module.parameter_names(), module.parameters()) if p.requires_grad]
        from .tensor_parallel import split_of

        # Tied modules: one group per key of the ranks (this data replica, this shard) whose stages
        # hold it; every rank takes part in every split, alone where it holds none. Their gradients
        # are summed before each step; the engine counts them in the norm on the first holding stage
        # (their placement says which stages hold them: Note [Parameter placement]).
        self.tied_groups = {}
        tied_stages = {}
        for key in sorted(module.tied_stages):
            stages = sorted(module.tied_stages[key])
            holders = [pipe_group[s] for s in stages] if self.stage_id in stages else [rank]
            group = groups.custom(f"tied:{key}:{','.join(map(str, holders))}", holders)
            if len(holders) > 1:
                self.tied_groups[key] = group
                for p in module.tied_modules[key].parameters():
                    tied_stages.setdefault(id(p), stages)
        if self.tied_groups and self.config.get("zero_optimization", {}).get("stage", 0) > 1:
            raise _zeal.ConfigError("config key 'zero_optimization.stage': tied layers across pipeline stages work "
                                    "with ZeRO stage 0 or 1 (their gradients are summed whole before the step)")
        placements = [mesh.placement_of(p, tied_stages.get(id(p))) for p in params]
        spec = [{"params": params, "names": names, "splits": [split_of(p) for p in params], "placements": placements}]
        # The config zeal.initialize parsed (without its pipeline section), else this one's.
        parsed = parsed_config if parsed_config is not None else _zeal.validate_config(json.dumps(self.config))
        self._core = _zeal.Engine(spec, parsed, groups)
        # The norm is the whole model's: the engine sums it over the ranks of this data index (every
        # stage and, in 3D, every tensor shard: the mesh's complement of data).
        self.model_comm = groups.group(topology.other_axes("data"))
        self.tensor_index = topology.coord(rank, "tensor")
        self.tensor_size = topology.axis_size("tensor")
        self.micro_batches = self._core.gradient_accumulation_steps
        self.micro_batch_size = self._core.train_micro_batch_size_per_gpu
        self.grid = PipelineParallelGrid(topology, rank, self.pipe_comm, self.data_comm, self.model_comm)
        self.mpu = self.grid
        from .engine import ZealLRScheduler, ZealOptimizer, _optimizer_groups, _pull_lr

        self.optimizer = ZealOptimizer(self._core, _optimizer_groups(self._core, module, params))
        _pull_lr(self._core, self.optimizer.param_groups)
        self.lr_scheduler = ZealLRScheduler(self._core) if "scheduler" in self.config else None
        self._step_applied = False
        self.batch_fn = None
        # training_data (DeepSpeed's): the first and last stages read it, each data-parallel index
        # its own shard, in order, forever; train_batch() without data_iter takes the next batch.
        self.training_dataloader, self.data_iterator = None, None
        if training_data is not None:
            from .data import distributed_loader
            from .utils import RepeatingLoader

            loader = distributed_loader(training_data, self.micro_batch_size, self.grid.get_data_parallel_rank(),
                                        self.grid.get_data_parallel_world_size(), collate_fn, shuffle=False)
            if self.is_first_stage() or self.is_last_stage():
                self.set_dataloader(RepeatingLoader(loader))
            else:
                self.training_dataloader = loader
        self._shapes = {}  # ("send" | "recv", kind) -> (shape, dtype), from the first message
        self._pending = []  # (Work, tensor) of sends in flight
        self._loopback = {_ACTIVATION: collections.deque(), _GRADIENT: collections.deque()}

    # --- the DeepSpeed surface ---
    def is_first_stage(self):
        return self.stage_id == 0

    def is_last_stage(self):
        return self.stage_id == self.num_stages - 1

    def get_pipeline_parallel_rank(self):
        return self.stage_id

    @property
    def prev_stage(self):
        return self.stage_id - 1

    @property
    def next_stage(self):
        return self.stage_id + 1

    @property
    def is_pipe_parallel(self):
        return self.num_stages > 1

    @property
    def is_data_parallel(self):
        return self.grid.get_data_parallel_world_size() > 1

    @property
    def is_model_parallel(self):
        return self.grid.get_slice_parallel_world_size() > 1

    @property
    def loss_model(self):
        return self.module.loss_fn

    @property
    def enable_backward_allreduce(self):
        return False  # the pipeline reduces after its last backward, as DeepSpeed's

    def set_batch_fn(self, fn):
        """fn(batch) post-processes every batch the first and last stages load (DeepSpeed's)."""
        self.batch_fn = fn

    def reset_activation_shape(self):
        """Forget the activation and gradient shapes learnt from the first batch (DeepSpeed's)."""
        self._shapes = {}

    @property
    def global_rank(self):
        return self.module.world.rank

    @property
    def world_size(self):
        return self.module.world.size

    @property
    def device(self):
        return self.device_

    def set_dataloader(self, loader):
        """The first and last stages read their micro-batches from `loader` (DeepSpeed's)."""
        if self.is_first_stage() or self.is_last_stage():
            self.training_dataloader = loader
            self.data_iterator = iter(loader)

    def set_dataiterator(self, iterator):
        if self.is_first_stage() or self.is_last_stage():
            self.training_dataloader = None
            self.data_iterator = iterator

    def forward(self, *args, **kwargs):
        raise RuntimeError("Only train_batch() is accessible in pipeline mode (as in DeepSpeed)")

    backward = step = forward

    def train_batch(self, data_iter=None):
        """One optimizer step over gradient_accumulation_steps micro-batches; returns the mean loss
        (on every stage). data_iter: where the first and last stages take micro-batches from (else
        the loader of initialize's training_data)."""
        if not torch.is_grad_enabled():
            raise RuntimeError("train_batch() requires gradients enabled; use eval_batch() instead")
        if data_iter is not None:
            self.set_dataiterator(data_iter)
        if self.data_iterator is None and (self.is_first_stage() or self.is_last_stage()):
            raise ValueError("train_batch() needs data: pass data_iter=, or training_data= to initialize")
        self.module.train()
        return self._optimizer_step(lambda: self._run(self.schedule_kind, self.data_iterator, train=True))

    def eval_batch(self, data_iter):
        """The mean loss over gradient_accumulation_steps micro-batches, forward only."""
        self.module.eval()
        with torch.no_grad():
            return self._run("inference", data_iter, train=False)

    # --- checkpoints ---
    def save_checkpoint(self, save_dir, tag=None, client_state=None, save_latest=True):
        """Every rank calls it. Each stage's engine (each tensor rank's, in 3D) saves one part,
        <save_dir>/<tag>/stage<s> or stage<s>-tensor<t>, sharded over its data group; the tag is
        published whole (zeal.checkpoint.save_parts). Parameters are named by layer, not by stage,
        and tensor-parallel slices carry their place in the full tensor, so the checkpoint loads at
        another number of stages, tensor-parallel size, data-parallel size or ZeRO stage. Returns
        the checkpoint directory."""
        from .checkpoint import save_parts
        from .engine import _check_save_dir

        _check_save_dir(save_dir)

        def part(stage, tensor):
            return f"stage{stage}" if self.tensor_size == 1 else f"stage{stage}-tensor{tensor}"

        tag = tag or f"global_step{self.global_steps}"
        parts = [part(s, t) for s in range(self.num_stages) for t in range(self.tensor_size)]
        layout = {"pipe": self.num_stages, "tensor": self.tensor_size, "data": self.data_comm.size}
        return save_parts(self._core, self.module.world, save_dir, tag, part(self.stage_id, self.tensor_index), parts,
                          layout, json.dumps(client_state or {}), [], save_latest)

    def load_checkpoint(self, load_dir, tag=None, load_optimizer_states=True, load_lr_scheduler_states=True,
                        load_module_only=False):
        """Loads a checkpoint saved by save_checkpoint (or by a plain engine, when the names match),
        whatever its layout. Returns (checkpoint directory, client_state)."""
        from .checkpoint import checkpoint_location

        root, parts = checkpoint_location(load_dir, tag)
        _, client = self._core.load_checkpoint_parts(parts, load_optimizer_states, load_lr_scheduler_states,
                                                     load_module_only)
        from .engine import _pull_lr

        _pull_lr(self._core, self.optimizer.param_groups)  # the schedule came back with the step count
        return root, json.loads(client) if client else {}

    # --- the executor ---
    def _neighbour(self, chunk, step):
        """The rank holding virtual stage (this one's) + step, step = +1 or -1."""
        p = self.num_stages
        return self.pipe_group[(chunk * p + self.stage_id + step) % p]

    def _run(self, kind, data_iter, train):
        """Executes this stage's instruction list (zeal/parallel/schedule.h), one handler per
        PipeOp: an instruction without a handler is a Zeal bug and raises, never passes silently."""
        m, p, v = self.micro_batches, self.num_stages, self.chunks
        run = _Execution(self, train, _zeal.pipeline_schedule(kind, p, self.stage_id, m, v), data_iter)
        handlers = {
            _zeal.PipeOp.LoadMicroBatch: run.load_micro_batch,
            _zeal.PipeOp.RecvActivation: run.recv_activation,
            _zeal.PipeOp.Forward: run.forward,
            _zeal.PipeOp.SendActivation: run.send_activation,
            _zeal.PipeOp.RecvGrad: run.recv_grad,
            _zeal.PipeOp.Backward: run.backward,
            _zeal.PipeOp.SendGrad: run.send_grad,
            _zeal.PipeOp.ReduceGrads: run.reduce_grads,
            _zeal.PipeOp.OptimizerStep: run.optimizer_step,
        }
        for op, mb, chunk in run.schedule:
            handler = handlers.get(op)
            if handler is None:
                raise _zeal.InternalError(f"pipeline stage {self.stage_id}: no handler for instruction {op!r}")
            handler(mb, chunk)
        started, busy, pipelined, losses = run.started, run.busy, run.pipelined, run.losses
        self._finish_sends()
        # For bubble measurements: the time this stage spent computing (forward and backward) and the
        # time from the batch's start to its optimizer step (the whole batch for eval).
        total = time.perf_counter() - started
        self.last_batch_timing = {"busy_s": busy, "pipelined_s": pipelined or total, "total_s": total}
        loss = torch.zeros(1, dtype=torch.float64)
        if self.is_last_stage():
            loss[0] = sum(v.double().item() for v in losses.values()) / m
        if p > 1:
            self.pipe_comm.broadcast(loss, root=p - 1, timeout_s=self.timeout_s).wait()
        return loss.float()[0]

    # Message tags: the kind (activation 0, gradient 1), and 2 + kind for the shape message that
    # precedes the first of each (kind, chunk). Along one channel each kind keeps its order.
    def _send(self, tensor, kind, chunk, dst):
        tensor = tensor.contiguous()
        world = self.p2p_comm
        if dst == world.rank:  # one stage holding neighbouring chunks: no message, the same order
            self._loopback[kind].append(tensor.clone())
            return
        key = ("send", kind, chunk)
        if key not in self._shapes:
            meta = torch.tensor([_DTYPES.index(tensor.dtype), tensor.dim(), *tensor.shape], dtype=torch.int64)
            header = torch.tensor([meta.numel()], dtype=torch.int64)
            self._pending.append((world.send(header, dst, _SHAPE + kind, self.timeout_s), header))
            self._pending.append((world.send(meta, dst, _SHAPE + kind, self.timeout_s), meta))
            self._shapes[key] = (tuple(tensor.shape), tensor.dtype)
        elif self._shapes[key] != (tuple(tensor.shape), tensor.dtype):
            raise ValueError(f"pipeline stage {self.stage_id}: a {'gradient' if kind else 'activation'} of shape "
                             f"{tuple(tensor.shape)} ({tensor.dtype}) after {self._shapes[key]}: every micro-batch "
                             "must have the same shape")
        self._pending.append((world.send(tensor, dst, kind, self.timeout_s), tensor))

    def _recv(self, kind, chunk, src):
        world = self.p2p_comm
        if src == world.rank:
            return self._loopback[kind].popleft()
        key = ("recv", kind, chunk)
        if key not in self._shapes:
            header = torch.zeros(1, dtype=torch.int64)
            world.recv(header, src, _SHAPE + kind, self.timeout_s).wait()
            meta = torch.zeros(int(header[0]), dtype=torch.int64)
            world.recv(meta, src, _SHAPE + kind, self.timeout_s).wait()
            dtype, ndim = _DTYPES[int(meta[0])], int(meta[1])
            self._shapes[key] = (tuple(int(d) for d in meta[2:2 + ndim]), dtype)
        shape, dtype = self._shapes[key]
        buffer = torch.empty(shape, dtype=dtype, device=self.device_)  # where this stage's activations live
        world.recv(buffer, src, kind, self.timeout_s).wait()
        return buffer

    def _sum_tied_gradients(self):
        # After the data-parallel reduction (the last backward), before the step: each holding
        # stage adds the others' share, so their copies take the same update.
        for key, group in self.tied_groups.items():
            for p in self.module.tied_modules[key].parameters():
                if p.requires_grad and p.grad is not None:
                    group.all_reduce(p.grad, "sum", self.timeout_s).wait()

    def _finish_sends(self):
        for work, _tensor in self._pending:
            work.wait()
        self._pending.clear()


class _Execution:
    """One batch's state while a stage executes its instructions: the tensors in flight by
    (micro-batch, chunk), and the measurements. Each method is one PipeOp."""

    def __init__(self, engine, train, schedule, data_iter):
        self.e, self.train, self.schedule, self.data_iter = engine, train, schedule, data_iter
        self.last_vs = engine.num_stages * engine.chunks - 1
        self.inputs, self.outputs, self.labels, self.losses, self.grads, self.loaded = {}, {}, {}, {}, {}, {}
        if train:  # the engine counts them and ends the accumulation with the last (one owner)
            engine._core.set_backwards_per_step(sum(1 for op, _, _ in schedule if op == _zeal.PipeOp.Backward))
        self.reduced = False
        self.started, self.busy, self.pipelined = time.perf_counter(), 0.0, None

    def vs(self, chunk):
        return chunk * self.e.num_stages + self.e.stage_id

    def load_micro_batch(self, mb, chunk):
        if mb not in self.loaded:  # one item per micro-batch, whichever chunks use it
            batch = next(self.data_iter)
            self.loaded[mb] = self.e.batch_fn(batch) if self.e.batch_fn is not None else batch
        x, y = self.loaded[mb]
        if self.vs(chunk) == 0:
            self.inputs[(mb, chunk)] = x
        if self.vs(chunk) == self.last_vs:
            self.labels[mb] = y

    def recv_activation(self, mb, chunk):
        x = self.e._recv(_ACTIVATION, chunk, self.e._neighbour(chunk, -1))
        self.inputs[(mb, chunk)] = x.requires_grad_(self.train and x.is_floating_point())

    def forward(self, mb, chunk):
        key = (mb, chunk)
        t0 = time.perf_counter()
        x = self.inputs[key]
        if torch.is_tensor(x) and x.requires_grad and x.is_leaf:
            x = x.clone()  # the received activation keeps its .grad; a first layer may work in place
        out = self.e.module(x, chunk)
        if self.vs(chunk) == self.last_vs:
            if self.e.module.loss_fn is None:
                raise ValueError("the last pipeline stage needs PipelineModule(loss_fn=...)")
            out = self.e.module.loss_fn(out, self.labels.pop(mb))
            self.losses[mb] = out.detach()
        self.outputs[key] = out
        if not self.train:
            self.inputs.pop(key)
        self.busy += time.perf_counter() - t0

    def send_activation(self, mb, chunk):
        key = (mb, chunk)
        out = self.outputs[key] if self.train else self.outputs.pop(key)
        self.e._send(out.detach(), _ACTIVATION, chunk, self.e._neighbour(chunk, +1))

    def recv_grad(self, mb, chunk):
        self.grads[(mb, chunk)] = self.e._recv(_GRADIENT, chunk, self.e._neighbour(chunk, +1))

    def backward(self, mb, chunk):
        key = (mb, chunk)
        # The accumulation ends with this stage's last backward, whatever its micro-batch: the
        # engine counts the backwards (set_backwards_per_step), and its bucketed data-parallel
        # reduction overlaps that last one and is complete when it returns (ReduceGrads checks it).
        out = self.outputs.pop(key)
        t0 = time.perf_counter()
        if self.vs(chunk) == self.last_vs:
            self.e._core.backward(out)
        else:
            self.e._core.backward_from([out], [self.grads.pop(key)])
        self.busy += time.perf_counter() - t0
        if self.vs(chunk) == 0:
            self.inputs.pop(key)

    def send_grad(self, mb, chunk):
        self.e._send(self.inputs.pop((mb, chunk)).grad, _GRADIENT, chunk, self.e._neighbour(chunk, -1))

    def reduce_grads(self, mb, chunk):
        # The data-parallel reduction finished inside the last backward (overlapped with it); the
        # tied weights' gradients are summed across their stages here, once per batch.
        if not self.e._core.is_gradient_accumulation_boundary():
            raise _zeal.InternalError(f"pipeline stage {self.e.stage_id}: ReduceGrads before the stage's last "
                                      "backward")
        self.e._sum_tied_gradients()
        self.reduced = True

    def optimizer_step(self, mb, chunk):
        if not self.reduced:
            raise _zeal.InternalError(f"pipeline stage {self.e.stage_id}: OptimizerStep before ReduceGrads")
        self.pipelined = time.perf_counter() - self.started
        self.e._core.step()
