"""One rank of a 2- or 4-rank job: a tiny causal transformer trained with its sequence split over the
ranks of a sequence group equals one torch process holding the whole sequence (same weights, same
batches), fp32 to 1e-5 for every step's loss, the first step's gradients and every parameter after
STEPS AdamW steps.

Each layout "A[xR]:H[:loss]" is Ulysses degree A (zeal.sequence.layer.DistributedAttention over the
mesh's sequence axis) and ring degree R (zeal.sequence.ring: RingAttention when A is 1, else
HierarchicalAttention, all-to-all inside and the ring across; causal, the load-balanced layout),
data = world / (A x R), with H attention heads (3 heads at degree 2: uneven, rank 0 holds two; a ring
degree above H shows the head count no longer caps it); loss "ce" is zeal.sequence.cross_entropy.sequence_parallel_cross_entropy, "vocab"
DeepSpeed's vocab_sequence_parallel_cross_entropy (seq-first logits) with a masked mean. Every
layout at the ZeRO stages of --stages. Samples are padded to different lengths (labels -100 past
the end), so the shards hold different numbers of counted tokens: a loss averaged per shard, or
scaled by the sequence degree the wrong way (Note [Sequence loss scale]), fails the comparison.
Also: the all-to-all's layouts against a hand-built expectation (both batch_dim_idx, even and uneven
heads), DeepSpeed's group accessors, sequence_parallel_size from the config, a mismatched one refused,
shards of different lengths refused by every rank.
Prints SEQ-OK from every rank that checked everything."""
import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import check, close  # noqa: E402
import zeal  # noqa: E402
import zeal.mesh  # noqa: E402
from zeal.sequence import cross_entropy as seq_ce  # noqa: E402
from zeal.sequence.layer import DistributedAttention, _SeqAllToAll, head_counts  # noqa: E402
from zeal.sequence.ring import HierarchicalAttention, RingAttention, positions  # noqa: E402
from zeal.utils import groups as ds_groups  # noqa: E402

LR, STEPS, B, SEQ, V, D, HD = 1e-2, 5, 2, 16, 19, 12, 4


def causal_attention(q, k, v, positions=None):
    """[b, s, h, d] each, the whole sequence in order: softmax(q k^T / sqrt(d), causal) v."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    s = q.shape[1]
    mask = torch.ones(s, s, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


class Block(torch.nn.Module):
    def __init__(self, heads, attention):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = torch.nn.LayerNorm(D), torch.nn.LayerNorm(D)
        self.qkv = torch.nn.Linear(D, 3 * heads * HD, bias=False)  # a key bias has a zero gradient: Adam would amplify round-off
        self.proj = torch.nn.Linear(heads * HD, D)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(D, 2 * D), torch.nn.GELU(), torch.nn.Linear(2 * D, D))
        self.attention = attention

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, HD).unbind(2)
        if self.attention is None:
            ctx = causal_attention(q, k, v)
        elif isinstance(self.attention, DistributedAttention):
            ctx = self.attention(q, k, v, 0)  # batch_dim_idx 0: [b, s, heads, d]
        else:
            ctx = self.attention(q, k, v)
        x = x + self.proj(ctx.reshape(b, s, -1))
        return x + self.mlp(self.ln2(x))


class Net(torch.nn.Module):
    """Embedding + learned positions (global position ids) -> 2 blocks -> LM head."""

    def __init__(self, heads, attention=None):
        super().__init__()
        torch.manual_seed(0)
        self.tok, self.pos = torch.nn.Embedding(V, D), torch.nn.Embedding(SEQ, D)
        self.blocks = torch.nn.ModuleList([Block(heads, attention) for _ in range(2)])
        self.head = torch.nn.Linear(D, V)

    def forward(self, tokens, positions):
        x = self.tok(tokens) + self.pos(positions)
        for blk in self.blocks:
            x = blk(x)
        return self.head(x)


def sample(step, data_rank):
    """tokens [B, SEQ] and shifted labels (the next token; -100 past each sample's length)."""
    g = torch.Generator().manual_seed(100 * step + data_rank)
    tokens = torch.randint(0, V, (B, SEQ), generator=g)
    labels = torch.full((B, SEQ), -100)
    labels[:, :-1] = tokens[:, 1:]
    for i in range(B):
        length = int(torch.randint(SEQ // 3, SEQ, (1,), generator=g))
        labels[i, length:] = -100
    return tokens, labels


def reference_run(heads, data):
    ref = Net(heads)
    opt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=0.0)
    losses = []
    for step in range(STEPS):
        opt.zero_grad()
        per_rank = []
        for d in range(data):
            tokens, labels = sample(step, d)
            logits = ref(tokens, torch.arange(SEQ).expand(B, SEQ))
            per_rank.append(F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), ignore_index=-100))
        (sum(per_rank) / data).backward()
        if step == 0:
            grads = [p.grad.clone() for p in ref.parameters()]
        opt.step()
        losses.append([x.item() for x in per_rank])
    return ref, losses, grads


def config(stage, sp=None):
    cfg = {"train_micro_batch_size_per_gpu": B, "gradient_accumulation_steps": 1, "steps_per_print": 1000,
           "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.0}},
           "zero_optimization": {"stage": stage, "reduce_bucket_size": 64, "stage3_param_persistence_threshold": 0},
           "comms_timeout_s": 60}
    if sp is not None:
        cfg["sequence_parallel_size"] = sp
    return cfg


def check_layouts(group):
    """_SeqAllToAll against the layout built by hand: element (b, s, h, d) of the whole tensor holds
    a number naming it; after the exchange rank r must hold the whole sequence of its heads."""
    p, r = group.size, group.rank
    for heads in (p, 2 * p, 2 * p + 1):
        whole = torch.arange(B * SEQ * heads * 3, dtype=torch.float32).view(B, SEQ, heads, 3)
        first = sum(head_counts(heads, p)[:r])
        mine_h = slice(first, first + head_counts(heads, p)[r])
        s_l = SEQ // p
        for bdi in (0, 1):
            shard = whole[:, r * s_l:(r + 1) * s_l]
            x = shard if bdi == 0 else shard.transpose(0, 1).contiguous()
            x.requires_grad_(True)
            y = _SeqAllToAll.apply(group, x, 2, 0, bdi)
            want = whole[:, :, mine_h] if bdi == 0 else whole[:, :, mine_h].transpose(0, 1)
            check(torch.equal(y, want), f"seq->heads layout, heads {heads}, batch_dim_idx {bdi}")
            back = _SeqAllToAll.apply(group, y, 0, 2, bdi, None, None, None, True, heads)
            check(torch.equal(back, x.detach()), f"heads->seq round trip, heads {heads}, batch_dim_idx {bdi}")
            (back * x.detach()).sum().backward()  # the exchanges' gradients are the exchanges back
            check(torch.equal(x.grad, x.detach()), f"gradient through both exchanges, heads {heads}, bdi {bdi}")


def check_groups(groups, rank, world):
    whole = groups.group(["ring", "sequence"])
    sp = whole.size
    check(ds_groups._get_sequence_parallel_world_size() == sp, "sequence parallel world size")
    check(ds_groups._get_sequence_parallel_rank() == rank % sp, "sequence parallel rank")
    check(ds_groups._get_sequence_parallel_group() == whole, "sequence parallel group is the mesh's")
    check(list(groups.mesh.group_of(["sequence"], rank)) == [rank - rank % groups.mesh.axis_size("sequence") + i
                                                               for i in range(groups.mesh.axis_size("sequence"))],
          "sequence groups are consecutive ranks (DeepSpeed's layout)")
    check(ds_groups._get_sequence_data_parallel_world_size() == world, "sequence x data group spans the world")


def parse(layout):
    """"A[xR]:heads[:ce|vocab]" -> (Ulysses degree A, ring degree R, heads, loss)."""
    degrees, heads, *loss = layout.split(":")
    a, _, r = degrees.partition("x")
    return int(a), int(r or 1), int(heads), (loss[0] if loss else "ce")


def train(layout, stage, ref, ref_losses, ref_grads, rank, world):
    sp, ring_size, heads, loss_kind = parse(layout)
    groups = zeal.mesh.build(sequence=sp, ring=ring_size)
    seq, ring, whole = groups.group("sequence"), groups.group("ring"), groups.group(["ring", "sequence"])
    data_rank = rank // whole.size
    if ring_size == 1:  # Ulysses: contiguous shards
        attention = DistributedAttention(lambda q, k, v: causal_attention(q, k, v), seq)
        mine = torch.arange(seq.rank * SEQ // sp, (seq.rank + 1) * SEQ // sp)
    else:  # Note [Ring layout]: two chunks per ring rank (split over the sequence group)
        attention = RingAttention(ring) if sp == 1 else HierarchicalAttention(seq, ring)
        mine = positions(SEQ, ring_size, ring.rank, sp, seq.rank)
    model = Net(heads, attention)
    # the mesh by DeepSpeed's mesh_param=(data, sequence) at ZeRO-2, by the config key at ZeRO 1 and 3
    mesh_param = (world // sp, sp) if ring_size == 1 and stage == 2 else None
    engine, *_ = zeal.initialize(model=model, config=config(stage, sp if stage % 2 else None), mesh_param=mesh_param)
    want = [a for a, n in (("data", world // whole.size), ("ring", ring_size), ("sequence", sp)) if n > 1]
    check(engine._core.reduction_axes == want, f"dense weights reduce over {engine._core.reduction_axes}")
    check(engine.train_batch_size() == B * (world // whole.size), f"train batch {engine.train_batch_size()}")
    what = f"layout {layout} stage {stage}"
    for step in range(STEPS):
        tokens, labels = sample(step, data_rank)
        logits = engine(tokens[:, mine], mine.expand(B, -1))
        if loss_kind == "ce":
            loss = seq_ce.sequence_parallel_cross_entropy(logits, labels[:, mine], whole)
        else:  # DeepSpeed's: seq-first logits, per-token losses of the whole sequence, a masked mean
            per_token = seq_ce.vocab_sequence_parallel_cross_entropy(logits.transpose(0, 1).contiguous(),
                                                                     labels[:, mine].t().contiguous(), seq)
            counted = (labels.t() != -100)
            loss = (per_token * counted).sum() / counted.sum()
        close(loss.detach(), torch.tensor(ref_losses[step][data_rank]), f"{what} step {step} loss")
        if ring_size == 1 and heads % sp == 0:  # q, k, v and the context: 4 x (1 - 1/P) of a local [b, s/P, h, d]
            sent = 4 * B * (SEQ // sp) * heads * HD * 4 * (sp - 1) // sp
            check(attention.all_to_all_bytes == sent, f"{what}: all-to-all bytes {attention.all_to_all_bytes}, "
                  f"want {sent}")
        engine.backward(loss)
        if step == 0:  # Adam hides a gradient's scale; the first step's gradients must equal too
            for (name, p), g in zip(model.named_parameters(), ref_grads):
                close(zeal.utils.safe_get_full_grad(p), g, f"{what} step 0 gradient of {name}")
        engine.step()
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        close(zeal.utils.safe_get_full_fp32_param(p), q.detach(), f"{what} {name}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layouts", required=True, help="comma-separated S:heads[:ce|vocab]")
    ap.add_argument("--stages", default="0,1,2,3")
    args = ap.parse_args()
    world = zeal.world()
    rank = world.rank
    refs = {}
    for layout in args.layouts.split(","):
        sp, ring_size, heads, _ = parse(layout)
        groups = zeal.mesh.build(sequence=sp, ring=ring_size)
        check_groups(groups, rank, world.size)
        if sp > 1:
            check_layouts(groups.group("sequence"))
        key = (heads, world.size // (sp * ring_size))
        if key not in refs:
            refs[key] = reference_run(*key)
        for stage in (int(s) for s in args.stages.split(",")):
            train(layout, stage, *refs[key], rank, world.size)
    # A config whose sequence_parallel_size is not the model's sequence group's is refused by name.
    sp = parse(args.layouts.split(",")[0])[0]
    seq = zeal.mesh.build(sequence=sp).group("sequence")
    try:
        zeal.initialize(model=Net(sp, DistributedAttention(causal_attention, seq)), config=config(0, 2 * sp))
        check(False, "a sequence_parallel_size the mesh does not have was accepted")
    except zeal.ConfigError as e:
        check("sequence_parallel_size" in str(e), f"the error names the key: {e}")
    try:
        zeal.initialize(model=Net(sp, DistributedAttention(causal_attention, seq)), config=config(0),
                        mesh_param=(world.size, 2))
        check(False, "a mesh_param holding more ranks than the world was accepted")
    except zeal.ConfigError as e:
        check("mesh_param" in str(e), f"the error names mesh_param: {e}")
    # Shards of different lengths on the ranks of a group are refused by every rank, naming the
    # counts, not joined into a shifted sequence (last: the group is broken after it).
    s_l = SEQ // seq.size + (1 if seq.rank == 0 else 0)
    try:
        _SeqAllToAll.apply(seq, torch.zeros(B, s_l, seq.size, HD), 2, 0, 0)
        check(False, "shards of different lengths were exchanged")
    except zeal.CommError as e:
        check("expects" in str(e) and "disagree" in str(e), f"the error names the counts: {e}")
    print(f"SEQ-OK rank {rank}", flush=True)


if __name__ == "__main__":
    main()
