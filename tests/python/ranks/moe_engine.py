"""One rank of a 2- or 4-rank job: a model with a zeal.moe MoE layer trained by Zeal's engine equals
one torch process that computes the same gating and every expert densely.

Model: Linear(6, D) -> MoE(D, expert MLP, 4 experts, ep_size, k) -> Linear(D, 3); loss = MSE +
AUX * l_aux. Each expert starts from its own seed by global id (expert rank x local experts + i),
so a rank that ran another expert, or an all-to-all that delivered the wrong slots, cannot pass.
The capacity factor is large enough that no token is dropped, so each token's output is the
gate-weighted sum of its top-k experts, which the reference computes with every expert on every
token (dense) and DeepSpeed's gate formulas written out (top-1: the softmax probability; top-2:
the two probabilities renormalised; l_aux per rank). The reference loss is the mean over every
rank's loss; gradient clipping (active) uses the norm of every distinct value once.

Each layout (--layouts "ep:k", "ep:k:d" for the dropless dispatch; data = world / ep) at ZeRO 0-3,
STEPS AdamW steps, fp32, 1e-5
relative for the loss of every step and for every parameter (the dense ones and this rank's
experts against the reference's experts of the same global ids). Also: DeepSpeed's group
accessors (zeal.utils.groups) name the mesh's groups; the Python all_to_all_single with uneven
splits; an expert with no token on some rank in some step (checked that it happened); a fixed router
that sends every token of rank 0 to the last rank's experts, at ZeRO 0-3 with both dispatches;
with --tmp, checkpoints across expert-parallel sizes and stages (check_checkpoints); with --ted,
tensor-expert-data parallelism (check_tensor_expert_data).
Prints MOE-OK from every rank that checked everything."""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import check, close  # noqa: E402
import zeal  # noqa: E402
import zeal.checkpoint  # noqa: E402
import zeal.comm  # noqa: E402
from zeal.moe.layer import MoE  # noqa: E402
from zeal.utils import groups as ds_groups  # noqa: E402

LR, STEPS, MICRO, CLIP, AUX, D, H, E = 1e-2, 20, 3, 0.5, 0.05, 8, 10, 4


def expert_mlp():
    return torch.nn.Sequential(torch.nn.Linear(D, H), torch.nn.Tanh(), torch.nn.Linear(H, D))


def seeded_expert(gid):
    torch.manual_seed(100 + gid)
    return expert_mlp()


def tensor_parallel_mlp(group):
    """expert_mlp() cut over `group` (the same random draws): column- then row-parallel."""
    from zeal.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    return torch.nn.Sequential(ColumnParallelLinear(D, H, gather_output=False, group=group), torch.nn.Tanh(),
                               RowParallelLinear(H, D, input_is_parallel=True, group=group))


def slice_of(full, param, shape=None):
    """This rank's slice (of `shape`, the parameter's own by default) of a full tensor for a
    tensor-parallel parameter; the tensor itself else."""
    if not getattr(param, "tensor_parallel", False):
        return full
    dim = param.partition_dim
    return full.narrow(dim, param.partition_offset, (shape or param.shape)[dim])


class Net(torch.nn.Module):
    def __init__(self, ep, k, dropless=False, tensor=None, expert_tp=False):
        super().__init__()
        torch.manual_seed(7)
        self.inp = torch.nn.Linear(6, D)
        template = tensor_parallel_mlp(tensor) if expert_tp else expert_mlp()
        self.moe = MoE(D, template, num_experts=E, ep_size=ep, k=k, capacity_factor=float(E), min_capacity=0,
                       top2_2nd_expert_sampling=False, dropless=dropless, enable_expert_tensor_parallelism=expert_tp)
        torch.manual_seed(8)
        self.moe.deepspeed_moe.gate.wg.weight.data = torch.randn(E, D)
        self.out = torch.nn.Linear(D, 3)
        for local, gid in zip(self.moe.deepspeed_moe.experts.deepspeed_experts, self.moe.global_expert_ids()):
            for p, q in zip(local.parameters(), seeded_expert(gid).parameters()):
                p.data.copy_(slice_of(q.data, p))

    def forward(self, x):
        y, l_aux, counts = self.moe(self.inp(x))
        return self.out(y), l_aux, counts


class DenseReference(torch.nn.Module):
    """The same model in one process: every expert on every token, combined by the gate."""

    def __init__(self, k):
        super().__init__()
        torch.manual_seed(7)
        self.inp = torch.nn.Linear(6, D)
        expert_mlp()  # the MoE's template expert draws from the same stream
        torch.manual_seed(8)
        self.wg = torch.nn.Parameter(torch.randn(E, D))
        self.out = torch.nn.Linear(D, 3)
        self.experts = torch.nn.ModuleList([seeded_expert(g) for g in range(E)])
        self.k = k

    def forward(self, x):
        h = self.inp(x)
        gates = F.softmax(h @ self.wg.t(), dim=1)
        first = gates.argmax(dim=1)
        mask1 = F.one_hot(first, E).float()
        if self.k == 1:
            weights = gates * mask1
            l_aux = (gates.mean(0) * mask1.mean(0)).sum() * E
        else:
            second = gates.masked_fill(mask1.bool(), float("-inf")).argmax(dim=1)
            mask2 = F.one_hot(second, E).float()
            pair = gates * (mask1 + mask2)
            weights = pair / pair.sum(dim=1, keepdim=True)
            l_aux = (gates.mean(0) * mask1.mean(0)).mean() * E * E
        every = torch.stack([expert(h) for expert in self.experts], dim=1)  # [tokens, experts, D]
        return self.out((weights.unsqueeze(2) * every).sum(dim=1)), l_aux


def batch(step, rank):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(MICRO, 6, generator=g), torch.randn(MICRO, 3, generator=g)


def config(stage):
    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1, "steps_per_print": 1000,
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.0}}, "gradient_clipping": CLIP,
            "zero_optimization": {"stage": stage, "reduce_bucket_size": 64,
                                  "stage3_param_persistence_threshold": 0}, "comms_timeout_s": 60}


def reference_run(k, world):
    ref = DenseReference(k)
    opt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=0.0)
    losses = []
    for step in range(STEPS):
        opt.zero_grad()
        per_rank = []
        for r in range(world):
            x, y = batch(step, r)
            out, l_aux = ref(x)
            per_rank.append(F.mse_loss(out, y) + AUX * l_aux)
        loss = sum(per_rank) / world
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)
        opt.step()
        losses.append([v.item() for v in per_rank])
    return ref, losses


def check_groups(ep, rank, world):
    name = f"ep_size_{ep}"
    want_ep = [rank // ep * ep + i for i in range(ep)]  # consecutive ranks, DeepSpeed's default layout
    want_edp = [rank % ep + j * ep for j in range(world // ep)]
    check(ds_groups._get_expert_parallel_group_ranks(name) == want_ep,
          f"expert group {ds_groups._get_expert_parallel_group_ranks(name)} != {want_ep}")
    check(ds_groups._get_expert_data_parallel_group_ranks(name) == want_edp,
          f"expert-data group {ds_groups._get_expert_data_parallel_group_ranks(name)} != {want_edp}")
    check(ds_groups._get_expert_parallel_world_size(name) == ep, "expert parallel world size")
    check(ds_groups._get_expert_parallel_rank(name) == rank % ep, "expert parallel rank")
    check(ds_groups._get_expert_data_parallel_world_size(name) == world // ep, "expert data parallel world size")
    check(ds_groups._get_expert_data_parallel_rank(name) == rank // ep, "expert data parallel rank")
    check(name in ds_groups._get_expert_parallel_group_dict(), "the group dict names the group")


def check_uneven_all_to_all(rank, world):
    # rank r sends (r + j) % 3 rows to rank j; row i of that chunk holds 100 r + 10 j + i.
    send = [(rank + j) % 3 for j in range(world)]
    recv = [(j + rank) % 3 for j in range(world)]
    x = torch.cat([torch.arange(n, dtype=torch.float32) + 100 * rank + 10 * j for j, n in enumerate(send)])
    x = x.unsqueeze(1).repeat(1, 2)
    out = torch.full((sum(recv), 2), -1.0)
    zeal.comm.all_to_all_single(out, x, output_split_sizes=recv, input_split_sizes=send)
    want = torch.cat([torch.arange(n, dtype=torch.float32) + 100 * j + 10 * rank for j, n in enumerate(recv)])
    check(torch.equal(out, want.unsqueeze(1).repeat(1, 2)), f"uneven all_to_all_single: {out.tolist()}")


def full_values(model):
    """{name under global expert ids: full fp32 master value} of every parameter (collective)."""
    rename = model.moe.global_names("moe")
    return {rename.get(n, n): zeal.utils.safe_get_full_fp32_param(p) for n, p in model.named_parameters()}


def check_against_reference(model, ref, what):
    got = full_values(model)
    close(got["inp.weight"], ref.inp.weight.detach(), what + " inp.weight")
    close(got["out.bias"], ref.out.bias.detach(), what + " out.bias")
    close(got["moe.deepspeed_moe.gate.wg.weight"], ref.wg.detach(), what + " gate")
    for gid in model.moe.global_expert_ids():
        for name in ("0.weight", "2.bias"):
            close(got[f"moe.deepspeed_moe.experts.deepspeed_experts.{gid}.{name}"],
                  ref.experts[gid].state_dict()[name], f"{what} expert {gid} {name}")


def check_checkpoints(tmp, rank, world):
    """Experts are saved under their global ids, one part per unit and group (Note [Checkpoints of
    several units]); the checkpoint resumes at another expert-parallel size and ZeRO stage on the
    reference's trajectory (ep 2 -> 4, 1 and 2; then ep 4 -> 1 value for value), converts to fp32
    under global names, and a model of another expert count is refused by parameter name."""
    global E
    k, half = 2, STEPS // 2
    ref, _ = reference_run(k, world)
    ck = Path(tmp) / "moe-ck"
    model = Net(2, k)
    engine, *_ = zeal.initialize(model=model, config=config(1))
    for step in range(half):
        x, y = batch(step, rank)
        out, l_aux, _ = engine(x)
        engine.backward(F.mse_loss(out, y) + AUX * l_aux)
        engine.step()
    engine.save_checkpoint(str(ck), tag="half")
    parts = sorted(p.name for p in (ck / "half").iterdir() if p.is_dir())
    check(len(parts) == 3, f"parts {parts}: the dense unit's, and one per expert rank (its expert-data group's)")
    for ep, stage in ((4, 2), (1, 0), (2, 3)):
        model = Net(ep, k)
        engine, *_ = zeal.initialize(model=model, config=config(stage))
        engine.load_checkpoint(str(ck), tag="half")
        check(engine.global_steps == half, f"steps after load: {engine.global_steps}")
        for step in range(half, STEPS):
            x, y = batch(step, rank)
            out, l_aux, _ = engine(x)
            engine.backward(F.mse_loss(out, y) + AUX * l_aux)
            engine.step()
        check_against_reference(model, ref, f"saved at ep 2 stage 1, resumed at ep {ep} stage {stage}")
        if ep == 4:  # and from ep 4 (one expert per rank) to ep 1 (every expert on every rank)
            engine.save_checkpoint(str(ck), tag="ep4")
            saved = full_values(model)
    model = Net(1, k)
    engine, *_ = zeal.initialize(model=model, config=config(1))
    engine.load_checkpoint(str(ck), tag="ep4")
    loaded = full_values(model)
    check(len(loaded) == 5 + 4 * E, f"names {sorted(loaded)}")
    for name, value in saved.items():  # each rank checks the expert it held at ep 4, and the dense weights
        check(torch.equal(loaded[name], value), f"ep 4 -> ep 1: {name} differs")
    if rank == 0:
        flat = zeal.checkpoint.to_fp32_state_dict(str(ck), tag="half")
        experts = sorted(n for n in flat if ".deepspeed_experts." in n and n.endswith("0.weight"))
        check(experts == [f"moe.deepspeed_moe.experts.deepspeed_experts.{g}.0.weight" for g in range(E)],
              f"fp32 export expert names {experts}")
    for count, needle in ((2, "holds expert parameter 'moe.deepspeed_moe.experts.deepspeed_experts.2."),
                          (8, "has no parameter 'moe.deepspeed_moe.experts.deepspeed_experts.4.")):
        saved_e, E = E, count
        try:
            engine, *_ = zeal.initialize(model=Net(2, k), config=config(0))
            engine.load_checkpoint(str(ck), tag="half")
            check(False, f"a {count}-expert model loaded a {saved_e}-expert checkpoint")
        except zeal.CheckpointError as e:
            check(needle in str(e), f"message: {e}")
        finally:
            E = saved_e


def check_tokens_sent_elsewhere(rank, world):
    """A fixed router that sends every token of rank 0 to the last rank's experts and every other
    rank's tokens to the other experts: rank 0 keeps nothing, the last rank computes only rank 0's
    tokens, some experts get no token at all. At ep = world, ZeRO 0-3, capacity and dropless
    dispatch, top-1: no hang, and every loss and expert weight equal to a dense reference."""
    u = torch.ones(D) / D ** 0.5
    last = list(range(E - E // world, E))
    wg = torch.stack([5 * u if e in last else -5 * u for e in range(E)]) + 0.1 * torch.randn(
        E, D, generator=torch.Generator().manual_seed(3))

    def data(step, r):
        g = torch.Generator().manual_seed(50 * step + r)
        sign = 1.0 if r == 0 else -1.0
        return sign * u + 0.05 * torch.randn(MICRO, D, generator=g), torch.randn(MICRO, D, generator=g)

    experts = [seeded_expert(g) for g in range(E)]
    opt = torch.optim.AdamW([p for e in experts for p in e.parameters()], lr=LR, weight_decay=0.0)
    losses = []
    for step in range(3):
        opt.zero_grad()
        per_rank = []
        for r in range(world):
            x, y = data(step, r)
            gates = F.softmax(x @ wg.t(), dim=1)
            choice = gates.argmax(dim=1)
            out = torch.stack([gates[t, choice[t]] * experts[int(choice[t])](x[t]) for t in range(MICRO)])
            per_rank.append(F.mse_loss(out, y))
        (sum(per_rank) / world).backward()
        torch.nn.utils.clip_grad_norm_([p for e in experts for p in e.parameters()], CLIP)
        opt.step()
        losses.append([v.item() for v in per_rank])
    for dropless in (False, True):
        for stage in (0, 1, 2, 3):
            moe = MoE(D, expert_mlp(), num_experts=E, ep_size=world, k=1, capacity_factor=float(E), min_capacity=0,
                      use_rts=False, dropless=dropless)
            moe.deepspeed_moe.gate.wg.weight.data.copy_(wg)
            moe.deepspeed_moe.gate.wg.weight.requires_grad_(False)
            for local, gid in zip(moe.deepspeed_moe.experts.deepspeed_experts, moe.global_expert_ids()):
                for p, q in zip(local.parameters(), seeded_expert(gid).parameters()):
                    p.data.copy_(q.data)
            model = torch.nn.ModuleDict({"moe": moe})
            model.forward = lambda x: moe(x)
            engine, *_ = zeal.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                         config=config(stage))
            what = f"tokens sent elsewhere, stage {stage}" + (" dropless" if dropless else "")
            for step in range(3):
                x, y = data(step, rank)
                out, _, counts = engine(x)
                if rank == 0:
                    check(counts[last].sum().item() == MICRO, f"{what}: rank 0 routed {counts.tolist()}")
                loss = F.mse_loss(out, y)
                close(loss.detach(), torch.tensor(losses[step][rank]), f"{what} step {step} loss")
                engine.backward(loss)
                engine.step()
            for local, gid in enumerate(moe.global_expert_ids()):
                got = zeal.utils.safe_get_full_fp32_param(moe.deepspeed_moe.experts.deepspeed_experts[local][0].weight)
                close(got, experts[gid][0].weight.detach(), f"{what}: expert {gid}")


def check_tensor_expert_data(rank, world, stages):
    """DeepSpeed-TED on 4 ranks, expert 2 x tensor 2 (data 1): the tensor ranks hold the same tokens,
    each sends half the slots (Duplicate Token Dropping: half the all-to-all bytes) and gathers the
    rest back; experts whole on every tensor rank (each computes its half of the slots, gradients
    summed over tensor) or split over it (enable_expert_tensor_parallelism: zeal.tensor_parallel
    experts). Every loss and parameter equal to the dense reference on the 2 expert ranks' batches."""
    groups = zeal.mesh.build(expert=2, tensor=2)
    tensor = groups.group("tensor")
    sample = groups.mesh.coord(rank, "expert")
    for k in (1, 2):
        ref, ref_losses = reference_run(k, 2)
        for expert_tp in (False, True):
            for stage in stages:
                model = Net(2, k, tensor=tensor, expert_tp=expert_tp)
                check(model.moe._zeal_groups is groups, "the MoE layer must take the mesh with the tensor axis")
                engine, *_ = zeal.initialize(model=model, config=config(stage))
                what = f"TED top-{k} stage {stage}" + (" tensor-parallel experts" if expert_tp else "")
                check(engine.train_batch_size() == MICRO * 2, f"{what}: train batch {engine.train_batch_size()}")
                for step in range(STEPS):
                    x, y = batch(step, sample)
                    out, l_aux, _ = engine(x)
                    loss = F.mse_loss(out, y) + AUX * l_aux
                    close(loss.detach(), torch.tensor(ref_losses[step][sample]), f"{what} step {step} loss")
                    engine.backward(loss)
                    engine.step()
                slots = -(-3 * k // 2) * 2  # capacity ceil(3 / 4 x 4 x k), padded to the tensor size
                want = 2 * E * (slots // 2) * D * 4
                check(model.moe.deepspeed_moe.all_to_all_bytes == want,
                      f"{what}: all-to-all bytes {model.moe.deepspeed_moe.all_to_all_bytes}, want {want} (half)")
                for name, p in model.named_parameters():
                    full = dict(ref.named_parameters()).get(name)
                    if name.startswith("moe.deepspeed_moe.experts."):
                        local, rest = name.split(".")[4], name.split(".", 5)[5]
                        gid = model.moe.global_expert_ids()[int(local)]
                        full = ref.experts[gid].state_dict()[rest]
                    elif name == "moe.deepspeed_moe.gate.wg.weight":
                        full = ref.wg
                    got = zeal.utils.safe_get_full_fp32_param(p)
                    close(got, slice_of(full.detach(), p, got.shape), f"{what} {name}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layouts", required=True, help="comma-separated ep:k, or ep:k:d for the dropless dispatch")
    ap.add_argument("--stages", default="0,1,2,3")
    ap.add_argument("--tmp", help="a directory every rank sees: also save and resume checkpoints")
    ap.add_argument("--ted", action="store_true", help="4 ranks: also tensor-expert-data parallelism")
    args = ap.parse_args()
    world = zeal.world()
    rank = world.rank
    if args.tmp:
        check_checkpoints(args.tmp, rank, world.size)
    check_uneven_all_to_all(rank, world.size)
    check_tokens_sent_elsewhere(rank, world.size)
    saw_empty_expert = False
    refs = {}
    for layout in args.layouts.split(","):
        ep, k, *mode = layout.split(":")
        ep, k, dropless = int(ep), int(k), mode == ["d"]
        if k not in refs:
            refs[k] = reference_run(k, world.size)
        ref, ref_losses = refs[k]
        for stage in (int(s) for s in args.stages.split(",")):
            model = Net(ep, k, dropless)
            check_groups(ep, rank, world.size)
            engine, *_ = zeal.initialize(model=model, config=config(stage))
            units = engine._core.units
            if ep > 1:
                axes = sorted(tuple(a) for a, _, _ in units)
                want = sorted([tuple(zeal._zeal.reduction_axes(model.moe._zeal_groups.mesh, ["expert"])),
                               tuple(zeal._zeal.reduction_axes(model.moe._zeal_groups.mesh))])
                check(axes == want, f"ep {ep}: units over {axes}, want {want}")
            check(engine.train_batch_size() == MICRO * world.size, f"train batch {engine.train_batch_size()}")
            for step in range(STEPS):
                x, y = batch(step, rank)
                out, l_aux, counts = engine(x)
                loss = F.mse_loss(out, y) + AUX * l_aux
                close(loss.detach(), torch.tensor(ref_losses[step][rank]),
                      f"ep {ep} k {k} stage {stage} step {step} loss" + (" dropless" if dropless else ""))
                check(int(counts.sum()) == MICRO * k, f"exp_counts {counts.tolist()} for {MICRO} tokens, k {k}")
                saw_empty_expert |= bool((counts == 0).any())
                engine.backward(loss)
                engine.step()
            what = f"ep {ep} k {k} stage {stage}" + (" dropless" if dropless else "")
            got = dict(zip([n for n, _ in model.named_parameters()],
                           [zeal.utils.safe_get_full_fp32_param(p) for p in model.parameters()]))
            close(got["inp.weight"], ref.inp.weight.detach(), what + " inp.weight")
            close(got["out.weight"], ref.out.weight.detach(), what + " out.weight")
            close(got["moe.deepspeed_moe.gate.wg.weight"], ref.wg.detach(), what + " gate")
            for local, gid in enumerate(model.moe.global_expert_ids()):
                for name in ("0.weight", "0.bias", "2.weight", "2.bias"):
                    key = f"moe.deepspeed_moe.experts.deepspeed_experts.{local}.{name}"
                    close(got[key], ref.experts[gid].state_dict()[name], f"{what} expert {gid} {name}")
    check(saw_empty_expert, "no step routed zero tokens to some expert: the empty-expert case was not exercised")
    if args.ted:  # last: its mesh is then the newest of expert size 2
        check_tensor_expert_data(rank, world.size, [int(s) for s in args.stages.split(",")])
    print(f"MOE-OK rank {rank}", flush=True)


if __name__ == "__main__":
    main()
