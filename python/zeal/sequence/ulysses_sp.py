"""Arctic Long Sequence Training (ALST) for Zeal, with DeepSpeed's names
(deepspeed.runtime.sequence_parallel.ulysses_sp): a Hugging Face model runs with Ulysses sequence
parallelism unmodified, a data-loader adapter shards each batch's sequence over the group, and two
tiled computations keep an MLP's intermediate and the logits from ever being whole.

    mpu = UlyssesSPAttentionHF.register_with_transformers(model, "sdpa", sequence_parallel_size=2,
                                                          micro_batch_size=1)
    engine, *_ = zeal.initialize(model=model, config=cfg, mpu=mpu)
    loader = UlyssesSPDataLoaderAdapter(loader, sp_rank=groups._get_sequence_parallel_rank(), ...)
    for batch in loader:
        logits = engine(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        loss = sequence_parallel_cross_entropy(logits, batch["shift_labels"], sp_group)

Note [Tiles deliver gradients once]: a tiled computation recomputes each tile in its backward and
takes the gradients with torch.autograd.grad, summing the parameters' over the tiles; the parameters
are inputs of the autograd function, so their summed gradients leave through its backward and each
parameter's gradient accumulator runs once per backward, as the engine's reduction expects.
(DeepSpeed instead runs a backward per tile and holds ZeRO's reduction back with ds_grad_is_ready.)"""
import torch

from .. import _zeal
from . import parallel_state_sp
from .layer import _SeqAllToAll


class UlyssesSPAttentionHF(torch.nn.Module):
    """A Hugging Face attention function (transformers' AttentionInterface: (module, q, k, v, mask,
    **kwargs) with q [b, heads, s, d]) run over the whole sequence of this rank's heads. Keys and
    values whose heads do not split like the queries' (grouped-query attention with fewer key heads
    than the degree, or heads not dividing it) are repeated to the query's head count first."""

    def __init__(self, attn, batch_size, attn_head_count, attn_head_size, kv_head_count, num_hidden_layers,
                 process_group, seq_length_is_variable=False, local_seq_length=None, global_seq_length=None,
                 disable_in_eval=False):
        super().__init__()
        self.attn = attn
        self.process_group = process_group
        self.world_size = process_group.size
        self.attn_head_count, self.kv_head_count = attn_head_count, kv_head_count
        self.attn_head_size = attn_head_size
        self.disable_in_eval = disable_in_eval
        p = self.world_size
        self.repeat_kv = kv_head_count != attn_head_count and (attn_head_count % p or kv_head_count % p)

    def forward(self, module, query, key, value, attention_mask, *args, **kwargs):
        if not module.training and self.disable_in_eval:
            return self.attn(module, query, key, value, attention_mask, *args, **kwargs)
        heads = query.shape[1]
        groups = None
        if self.repeat_kv and key.shape[1] != heads:
            factor = heads // key.shape[1]
            key, value = key.repeat_interleave(factor, dim=1), value.repeat_interleave(factor, dim=1)
            groups = getattr(module, "num_key_value_groups", None)
            module.num_key_value_groups = 1
        # [b, heads, s/P, d] -> [b, s/P, heads, d] -> the whole sequence of this rank's heads
        q, k, v = (_SeqAllToAll.apply(self.process_group, t.transpose(1, 2), 2, 0, 0).transpose(1, 2)
                   for t in (query, key, value))
        try:
            context, weights = self.attn(module, q, k, v, None, *args, **kwargs)
        finally:
            if groups is not None:
                module.num_key_value_groups = groups
        # HF's attention returns [b, s, heads of this rank, d]
        out = _SeqAllToAll.apply(self.process_group, context, 0, 2, 0, None, None, None, True, heads)
        return out, weights

    @classmethod
    def register_with_transformers(cls, model_name_or_path, core_attn_implementation, sequence_parallel_size,
                                   micro_batch_size, seq_length=None, seq_length_is_variable=True,
                                   disable_in_eval=False, max_length=None):
        """Wraps transformers' attention function `core_attn_implementation` (process-wide, as
        DeepSpeed does) and returns the mpu to pass to zeal.initialize (None at degree 1).
        `model_name_or_path`: a model or anything with `.config` (a local path works too; nothing
        is downloaded)."""
        if sequence_parallel_size == 1:
            return None
        from transformers import AutoConfig
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if max_length is not None and seq_length is None:
            seq_length = max_length
        if not seq_length_is_variable and seq_length is None:
            raise _zeal.ConfigError("Either `seq_length_is_variable` needs to be `True` or `seq_length` needs to be "
                                    "set")
        groups = parallel_state_sp.initialize_sequence_parallel(sequence_parallel_size)
        config = model_name_or_path.config if hasattr(model_name_or_path, "config") else \
            AutoConfig.from_pretrained(model_name_or_path)
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        current = getattr(config, "_attn_implementation", None)
        if current is not None and current != core_attn_implementation:
            raise _zeal.ConfigError(f"core_attn_implementation='{core_attn_implementation}' does not match model "
                                    f"config attn_implementation='{current}'")
        if core_attn_implementation in ("eager", "paged|eager"):
            raise _zeal.ConfigError(f"core_attn_implementation='{core_attn_implementation}' is not supported: it "
                                    "needs a 4D attention_mask (O(n^2) memory); use 'sdpa', 'flex_attention' or "
                                    "a flash attention variant")
        if core_attn_implementation not in ALL_ATTENTION_FUNCTIONS:
            raise _zeal.ConfigError(f"{core_attn_implementation} is not a valid attn_implementation. The choices are "
                                    f"{list(ALL_ATTENTION_FUNCTIONS.keys())}")
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        core = ALL_ATTENTION_FUNCTIONS[core_attn_implementation]
        core = getattr(core, "_zeal_core", core)  # registering twice wraps the original once
        uattn = cls(core, micro_batch_size, heads, head_dim, kv_heads, config.num_hidden_layers,
                    groups.group("sequence"), seq_length_is_variable,
                    None if seq_length is None else seq_length // sequence_parallel_size, seq_length,
                    disable_in_eval)

        def uattn_wrapper(module, query, key, value, attention_mask, *args, **kwargs):
            # The sequence is split: a mask for the local part cannot describe the whole; the core
            # attention runs causal over the whole sequence (as DeepSpeed's wrapper)
            return uattn(module, query, key, value, None, *args, **kwargs)

        uattn_wrapper._zeal_core = core
        ALL_ATTENTION_FUNCTIONS[core_attn_implementation] = uattn_wrapper
        return parallel_state_sp


class UlyssesSPDataLoaderAdapter:
    """DeepSpeed's: each rank's loader gives one batch; the sequence group gathers the P batches and
    every rank yields, in rank order, its sequence shard of each (so P iterations here are one of
    the loader). `labels` become `shift_labels` (the next token, -100 past the end), shifted before
    sharding so no shard loses its boundary token. Batches are dicts of [batch, seq] tensors and
    must carry position_ids (the shards keep global positions)."""

    def __init__(self, dl, sp_rank, sp_group, sp_world_size, device=None):
        self.dl, self.sp_rank, self.sp_group, self.sp_world_size = dl, sp_rank, sp_group, sp_world_size
        self.device = device
        self.iter = iter(dl)
        self.queue = []

    def __len__(self):
        return len(self.dl) * self.sp_world_size

    def __iter__(self):
        return self

    def __next__(self):
        if not self.queue:
            try:
                self.refill()
            except StopIteration:
                self.iter = iter(self.dl)
                raise
        return self.queue.pop(0)

    def _gather(self, key, t):
        """This rank's [batch, seq] tensor -> every sequence rank's, in rank order."""
        g = self.sp_group
        shape = torch.tensor(list(t.shape), dtype=torch.int64)
        if shape.numel() != 2:
            raise _zeal.ConfigError(f"UlyssesSPDataLoaderAdapter: batch key '{key}' has shape {tuple(t.shape)}; "
                                    "tensors of [batch, seq] are sharded")
        shapes = torch.empty(2 * g.size, dtype=torch.int64)
        g.all_gather(shapes, shape).wait()
        shapes = shapes.view(g.size, 2).tolist()
        most = max(a * b for a, b in shapes)
        flat = torch.zeros(most, dtype=t.dtype)
        flat[:t.numel()] = t.reshape(-1)
        out = torch.empty(g.size * most, dtype=t.dtype)
        g.all_gather(out, flat).wait()
        return [out[r * most:r * most + a * b].view(a, b) for r, (a, b) in enumerate(shapes)]

    def refill(self):
        batch = next(self.iter)
        if "position_ids" not in batch:
            raise _zeal.ConfigError("Ulysses SP requires `position_ids` in every dataloader batch (the shards keep "
                                    "their global positions)")
        gathered = {}
        for key, value in batch.items():
            if not torch.is_tensor(value):
                raise _zeal.ConfigError(f"UlyssesSPDataLoaderAdapter: batch key '{key}' is a {type(value).__name__}; "
                                        "only tensors of [batch, seq] are sharded")
            gathered[key] = self._gather(key, value)
        p, r = self.sp_world_size, self.sp_rank
        for i in range(p):
            sample = {k: v[i] for k, v in gathered.items()}
            seqlen = sample["position_ids"].shape[1]
            for k, v in sample.items():
                if v.shape[1] != seqlen:
                    raise _zeal.ConfigError(f"{k}'s shape {tuple(v.shape)} must match input_ids's shape "
                                            f"{tuple(sample['position_ids'].shape)}")
            if seqlen % p:
                raise _zeal.ConfigError(f"batch's seqlen={seqlen} isn't divisible by sp-size={p}")
            if "labels" not in sample:
                raise _zeal.ConfigError("UlyssesSPDataLoaderAdapter: the batch has no 'labels' to shift")
            labels = sample.pop("labels")
            sample["shift_labels"] = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
            chunk = seqlen // p
            shard = {k: v[:, r * chunk:(r + 1) * chunk].contiguous() for k, v in sample.items()}
            if self.device is not None:
                shard = {k: v.to(self.device) for k, v in shard.items()}
            self.queue.append(shard)


def _params(module, compute_params):
    ps = list(module.parameters()) if compute_params is None else list(compute_params)
    return [p for p in ps if p.requires_grad]


class _Tiled(torch.autograd.Function):
    """fn(module, tile of x, tiles of the extras) over `tiles` chunks of dim `dim`, without a graph;
    the backward recomputes tile by tile (Note [Tiles deliver gradients once]). reduction None: the
    outputs joined on `dim`; "mean" / "sum": scalar outputs reduced."""

    @staticmethod
    def forward(ctx, fn, module, tiles, dim, reduction, n_extra, x, *rest):
        extras, params = rest[:n_extra], rest[n_extra:]
        ctx.fn, ctx.module, ctx.tiles, ctx.dim, ctx.reduction = fn, module, tiles, dim, reduction
        ctx.extras, ctx.params, ctx.x = extras, params, x.detach()
        with torch.no_grad():
            outs = [fn(module, *parts) for parts in _chunks(x, extras, tiles, dim)]
        if reduction is None:
            return torch.cat(outs, dim=dim)
        total = torch.stack([o.reshape(()) for o in outs]).sum()
        return total / len(outs) if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad):
        import contextlib

        from ..zero import stage3_of

        stage3 = stage3_of(ctx.module)
        chunks = list(_chunks(ctx.x, ctx.extras, ctx.tiles, ctx.dim))
        x_grads, p_grads, offset = [], [None] * len(ctx.params), 0
        for parts in chunks:
            tile = parts[0].requires_grad_(True)
            # ZeRO-3: the recomputed graph saves parameters as indices and gathers them on use, as
            # the engine's forward does
            with torch.enable_grad(), (stage3.saved_tensors() if stage3 else contextlib.nullcontext()):
                out = ctx.fn(ctx.module, tile, *parts[1:])
            if ctx.reduction is None:
                g = grad.narrow(ctx.dim, offset, out.shape[ctx.dim])
                offset += out.shape[ctx.dim]
            else:
                g = (grad / len(chunks) if ctx.reduction == "mean" else grad).expand_as(out)
            got = torch.autograd.grad(out, [tile, *ctx.params], g, allow_unused=True)
            x_grads.append(got[0] if got[0] is not None else torch.zeros_like(tile))
            for i, gp in enumerate(got[1:]):
                if gp is not None:
                    p_grads[i] = gp if p_grads[i] is None else p_grads[i] + gp
        x_grad = torch.cat(x_grads, dim=ctx.dim) if ctx.needs_input_grad[6] else None
        return (None,) * 6 + (x_grad,) + (None,) * len(ctx.extras) + tuple(p_grads)


def _run(fn, module, tiles, dim, reduction, x, extras, params):
    """_Tiled.apply; under ZeRO-3 the parameters are whole while autograd records their shapes."""
    from ..zero import stage3_of

    stage3 = stage3_of(module)
    held = stage3.gather(params) if stage3 else []
    try:
        return _Tiled.apply(fn, module, tiles, dim, reduction, len(extras), x, *extras, *params)
    finally:
        if stage3:
            stage3.release(held)


def _chunks(x, extras, tiles, dim):
    xs = torch.chunk(x, tiles, dim=dim)
    es = [torch.chunk(e, tiles, dim=dim) for e in extras]
    for i, xi in enumerate(xs):
        yield (xi.detach(), *[e[i] for e in es])


class TiledMLP:
    """DeepSpeed's TiledMLP: `TiledMLP.apply(fn, self, x, shards, compute_params)` computes
    fn(self, x) in `shards` tiles of the sequence dim (x [b, s, h] or [s, h]), so the MLP's wide
    intermediate exists for one tile at a time, in the forward and in the backward (which recomputes
    it). compute_params: the parameters fn uses (None: all of `self`'s)."""

    @staticmethod
    def apply(fn, self, x, shards, compute_params=None):
        params = _params(self, compute_params)
        return _run(fn, self, int(shards), -2, None, x, [], params)


class TiledFusedLogitsLoss:
    """DeepSpeed's TiledFusedLogitsLoss: `TiledFusedLogitsLoss.apply(fn, self, x, y, mask, shards,
    compute_params, output_reduction)`; fn(self, x_tile, y_tile[, mask_tile]) returns one tile's
    loss (the logits exist for one tile at a time). x [b, s, h], y and mask [b, s]; the tiles cut
    the flattened b x s positions; "mean" is the mean of the tiles' values, "sum" their sum."""

    @staticmethod
    def apply(fn, self, x, y, mask, shards, compute_params=None, output_reduction="mean"):
        if output_reduction not in ("mean", "sum"):
            raise _zeal.ConfigError(f'unknown reduction {output_reduction!r}: valid values are: "mean"/"sum"')
        if x.dim() < 2:
            raise _zeal.ConfigError("x must be at least 2D [batch_size, seq_len, ...]")
        if y.dim() < 2:
            raise _zeal.ConfigError("y must be at least 2D [batch_size, seq_len, ...]")
        if x.shape[:2] != y.shape[:2]:
            raise _zeal.ConfigError("x and y batch/seq dims must match")
        extras = [y.reshape(-1, *y.shape[2:])]
        if mask is not None:
            if mask.dim() != 2:
                raise _zeal.ConfigError(f"mask must be 2D [batch_size, seq_len], but got {mask.dim()}")
            if mask.shape != x.shape[:2]:
                raise _zeal.ConfigError("mask shape must match x and y batch/seq")
            extras.append(mask.reshape(-1))
        params = _params(self, compute_params)
        flat = x.reshape(-1, *x.shape[2:])
        return _run(fn, self, int(shards), 0, output_reduction, flat, extras, params)
