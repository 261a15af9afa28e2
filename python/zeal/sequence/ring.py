"""Ring attention over the mesh's ring axis, and its hierarchical composition with Ulysses, so the
sequence degree is not capped by the head count (docs/long_sequences.md).

Note [Ring layout]: the sequence is cut into 2R chunks of c positions; ring rank p holds chunk p
then chunk 2R-1-p (one early, one late), so under a causal mask every rank does the same work:
2c^2 unmasked products per step. At step i rank p holds the keys and values of ring rank
src = (p - i) mod R, passed from p-1 to p+1 each step:
  step 0 (its own):   every query against every key, causal on the local 2c positions;
  src < p:            every query against src's first chunk (src's second chunk is later than all);
  src > p:            the second chunk's queries against all of src's keys (the first sees none).
Partial results merge exactly by their log-sum-exp: out = sum_b out_b exp(lse_b - lse), with
lse = logaddexp over the blocks, in fp32. The backward walks the same ring with the merged out and
lse: per block P = exp(scale q k^T - lse), dS = P (dO v^T - rowsum(dO * out)); dQ stays, and each
block's dK and dV travel with the keys and values back to their owner (one more hop at the end).
Each hop is one uneven all_to_all over the ring group (only the next rank gets elements), so it
carries the collective's timeout and signature.

Hierarchical (HierarchicalAttention): the sequence axis (Ulysses, consecutive ranks) inside, the
ring axis across. Ring rank p's two chunks, joined, are split evenly over its sequence group; the
all-to-all gathers them back with a share of the heads, the ring runs on that, the reverse
all-to-all returns the context. Degree = ring x sequence, any multiple of the heads' limit."""
import math

import torch

from .. import _zeal
from .layer import _SeqAllToAll, hold_mesh


def positions(seq_len, ring, ring_rank, sequence=1, sequence_rank=0):
    """The global positions a rank holds (Note [Ring layout]; with a sequence axis, its even part of
    the ring rank's two chunks): index the sequence with these to shard tokens, labels and
    position ids alike."""
    if seq_len % (2 * ring * sequence):
        raise _zeal.ConfigError(f"ring attention: the sequence ({seq_len} positions) must divide by 2 x ring "
                                f"({ring}) x sequence ({sequence}) = {2 * ring * sequence}")
    c = seq_len // (2 * ring)
    both = torch.cat([torch.arange(ring_rank * c, (ring_rank + 1) * c),
                      torch.arange((2 * ring - 1 - ring_rank) * c, (2 * ring - ring_rank) * c)])
    part = 2 * c // sequence
    return both[sequence_rank * part:(sequence_rank + 1) * part]


def _pass(group, tensors):
    """Send `tensors` (flattened together) to the next ring rank, receive the previous rank's."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    p, r = group.size, group.rank
    n = flat.numel()
    send = [0] * p
    recv = [0] * p
    send[(r + 1) % p] = n
    recv[(r - 1) % p] = n
    out = torch.empty_like(flat)
    group.all_to_all(out, flat, recv, send, site="ring attention pass").wait()
    pieces = out.split([t.numel() for t in tensors])
    return [x.view_as(t) for x, t in zip(pieces, tensors)]


def _scores(q, k, scale, causal):
    """scale q k^T, [b, h, lq, lk]; causal: the upper triangle masked (a block on the diagonal)."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    return s


def _block(q, k, v, scale, causal):
    """[b, h, lq, d] x [b, h, lk, d] -> (out [b, h, lq, d], lse [b, h, lq]), fp32."""
    s = _scores(q, k, scale, causal)
    lse = torch.logsumexp(s, dim=-1)
    return torch.matmul(torch.exp(s - lse.unsqueeze(-1)), v), lse


def _merge(out, lse, rows, block_out, block_lse):
    o, l = out[:, :, rows], lse[:, :, rows]
    new = torch.logaddexp(l, block_lse)
    out[:, :, rows] = o * torch.exp(l - new).unsqueeze(-1) + block_out * torch.exp(block_lse - new).unsqueeze(-1)
    lse[:, :, rows] = new


def _block_grad(q, k, v, out, lse, dout, scale, causal):
    """One block's (dq, dk, dv) given the merged out and lse of its query rows."""
    prob = torch.exp(_scores(q, k, scale, causal) - lse.unsqueeze(-1))
    dv = torch.matmul(prob.transpose(-1, -2), dout)
    dprob = torch.matmul(dout, v.transpose(-1, -2))
    ds = prob * (dprob - (dout * out).sum(-1, keepdim=True))
    return torch.matmul(ds, k) * scale, torch.matmul(ds.transpose(-1, -2), q) * scale, dv


def _steps(group):
    """(step, the ring rank whose keys and values this rank holds then), Note [Ring layout]."""
    p, r = group.size, group.rank
    for i in range(p):
        src = (r - i) % p
        yield i, src


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, scale):
        # [b, h, 2c, d] fp32 each; the local layout of Note [Ring layout]
        c = q.shape[2] // 2
        r = group.rank
        out = torch.zeros_like(q)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=q.dtype)
        kv = [k, v]
        for i, src in _steps(group):
            if i:
                kv = _pass(group, kv)
            kk, vv = kv
            if i == 0:
                o, l = _block(q, kk, vv, scale, causal=True)
                _merge(out, lse, slice(None), o, l)
            elif src < r:
                o, l = _block(q, kk[:, :, :c], vv[:, :, :c], scale, causal=False)
                _merge(out, lse, slice(None), o, l)
            else:
                o, l = _block(q[:, :, c:], kk, vv, scale, causal=False)
                _merge(out, lse, slice(c, None), o, l)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.scale = group, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        group, scale = ctx.group, ctx.scale
        dout = dout.contiguous()
        c = q.shape[2] // 2
        r = group.rank
        dq = torch.zeros_like(q)
        kk, vv = k, v
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)  # travel with the keys and values they belong to
        for i, src in _steps(group):
            if i:
                kk, vv, dk, dv = _pass(group, [kk, vv, dk, dv])
            if i == 0:
                gq, gk, gv = _block_grad(q, kk, vv, out, lse, dout, scale, causal=True)
                dq += gq
                dk += gk
                dv += gv
            elif src < r:
                gq, gk, gv = _block_grad(q, kk[:, :, :c], vv[:, :, :c], out, lse, dout, scale, causal=False)
                dq += gq
                dk[:, :, :c] += gk
                dv[:, :, :c] += gv
            else:
                gq, gk, gv = _block_grad(q[:, :, c:], kk, vv, out[:, :, c:], lse[:, :, c:], dout[:, :, c:], scale,
                                         causal=False)
                dq[:, :, c:] += gq
                dk += gk
                dv += gv
        if group.size > 1:  # home: the last holder of each rank's dk, dv is the rank before it
            dk, dv = _pass(group, [dk, dv])
        return dq, dk, dv, None, None


def ring_attention(q, k, v, group, scale=None):
    """Causal attention of a sequence held in Note [Ring layout] over `group` (the ring): q, k, v
    [b, s_local, heads, d] (batch first), returns the context in the same layout. Keys and values
    need the query's head count (repeat them for grouped-query attention)."""
    if q.shape[2] != k.shape[2] or k.shape != v.shape:
        raise _zeal.ConfigError(f"ring attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must "
                                "hold the same heads (repeat the key and value heads for grouped-query attention)")
    if q.shape[1] % 2:
        raise _zeal.ConfigError(f"ring attention: a rank holds two equal chunks, got {q.shape[1]} positions")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    dtype = q.dtype
    q, k, v = (t.transpose(1, 2).float().contiguous() for t in (q, k, v))
    return _RingAttention.apply(q, k, v, group, scale).transpose(1, 2).to(dtype)


class RingAttention(torch.nn.Module):
    """Ring attention over `ring_group` as a module: forward(q, k, v) -> context, [b, s_local, h, d]."""

    def __init__(self, ring_group, scale=None):
        super().__init__()
        self.group, self.scale = ring_group, scale
        hold_mesh(self, ring_group)

    def forward(self, query, key, value):
        return ring_attention(query, key, value, self.group, self.scale)


class HierarchicalAttention(torch.nn.Module):
    """Ulysses over `sequence_group` inside, ring attention over `ring_group` across:
    forward(q, k, v) on [b, s_local, h, d] (positions() of this rank), returns the context."""

    def __init__(self, sequence_group, ring_group, scale=None):
        super().__init__()
        self.seq, self.ring, self.scale = sequence_group, ring_group, scale
        hold_mesh(self, sequence_group)

    def forward(self, query, key, value):
        heads = query.shape[2]
        q, k, v = (_SeqAllToAll.apply(self.seq, t, 2, 0, 0) for t in (query, key, value))
        ctx = ring_attention(q, k, v, self.ring, self.scale)
        return _SeqAllToAll.apply(self.seq, ctx, 0, 2, 0, None, None, None, True, heads)
