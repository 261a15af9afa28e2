"""One rank of a 2-, 3- or 4-rank job: ZeRO-3 with ZeRO++'s quantized weights (qwZ,
zero_quantized_weights) equals a plain-torch process whose forward and backward see the weights
exactly as qwZ delivers them, fp32 to 1e-5: every step's loss, the first step's gradients and the
final fp32 weights. The reference pads each parameter to a multiple of the rank count, cuts it into
one chunk per rank, and quantizes each chunk in 8-bit blocks of 2048 elements (kernels/cpu/quantize.h,
rounded as the kernel rounds), then AdamW updates the exact weights with those gradients. The model's
parameters have 1, 7, 8, 9, 72 and 4099 elements, so chunks end inside blocks and blocks are cut by
partitions. A control run checks that the quantized reference differs from the exact one (the test
can fail), and qwZ off equals the exact reference; with --hpz H, ZeRO++'s hierarchical partition
(secondary copies within groups of H ranks, zero_hpz_partition_size) equals it too. Prints ZEROPP-OK."""
import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import check, close  # noqa: E402
import zeal  # noqa: E402

B, STEPS, LR, BLOCK = 8, 6, 1e-2, 2048


class Odd(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.scale9 = torch.nn.Parameter(1 + 0.1 * torch.randn(9))
        self.lin1 = torch.nn.Linear(9, 8)                         # 72 and 8
        self.table = torch.nn.Parameter(0.5 * torch.randn(4099, 1))  # 4099 (2-D: qgZ quantizes it)
        self.lin2 = torch.nn.Linear(8, 1)                         # 8 and 1
        self.shift7 = torch.nn.Parameter(0.1 * torch.randn(7))    # 7
        self.gain = torch.nn.Parameter(torch.tensor([1.5]))       # 1

    def forward(self, x, idx, y):
        h = torch.tanh(self.lin1(x * self.scale9) + self.table[idx])
        out = self.lin2(h).squeeze(-1) * self.gain + self.shift7.sum()
        return F.mse_loss(out, y)


def batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(B, 9, generator=g), torch.randint(0, 4099, (B,), generator=g), torch.randn(B, generator=g)


def blocks(x, bits, block):
    """The values x's blocks arrive as, computed as kernels/cpu/quantize.h computes them (fp32)."""
    qmax = 127.0 if bits == 8 else 7.0
    out = []
    for b in x.split(block):
        amax = b.abs().max()
        if amax == 0:
            out.append(torch.zeros_like(b))
            continue
        scale, inv = amax / qmax, qmax / amax
        out.append(torch.round(b * inv).clamp(-qmax, qmax) * scale)
    return torch.cat(out)


def qwz(w, world):
    """What every rank computes with: w padded to world chunks, each chunk 8-bit block-quantized."""
    flat = w.detach().reshape(-1)
    n = flat.numel()
    c = -(-n // world)
    padded = torch.cat([flat, flat.new_zeros(c * world - n)])
    return torch.cat([blocks(chunk, 8, BLOCK) for chunk in padded.split(c)])[:n].view_as(w)


def q4(row):
    """4-bit blocks of 256, qgZ's messages."""
    return blocks(row, 4, 256)


def sent(msgs, loco, key):
    """What arrives of the messages one rank sends in one hop of qgZ (msgs[k] to peer k): 4-bit
    blocks; with LoCo (loco: {"beta", "errors"}) each message quantizes itself plus this rank's error
    for it, the error becomes beta * error + (1 - beta) * (what was lost), and the hop's errors are
    kept as 8-bit blocks of 256 until the next reduction (Note [LoCo error feedback])."""
    if loco is None:
        return [q4(m) for m in msgs]
    n = len(msgs[0])
    errors = loco["errors"].get(key, torch.zeros(n * len(msgs)))
    beta = torch.tensor(loco["beta"], dtype=torch.float32)
    keep = torch.tensor(1.0, dtype=torch.float32) - beta  # rounded to fp32 as the kernel does
    out, new = [], []
    for k, m in enumerate(msgs):
        e = errors[k * n:(k + 1) * n]
        c = m + e
        d = q4(c)
        out.append(d)
        new.append(beta * e + keep * (c - d))
    loco["errors"][key] = blocks(torch.cat(new), 8, 256)
    return out


def qgz_reduce(local, world, hpz, loco=None, name=""):
    """The sum over ranks of the local gradients `local[r]` (flat, padded to world chunks) as
    Note [Quantized gradient reduction] computes it: {rank: its reduced chunk}."""
    h, d = hpz, world // hpz
    c = local[0].numel() // world
    rows = [g.view(d, h, c) for g in local]
    partial = {}
    for node in range(d):
        if h == 1:
            partial[node] = rows[node].reshape(-1)
            continue
        arrived = [sent([rows[node * h + s][:, j, :].reshape(-1) for j in range(h)], loco, (name, node * h + s, "intra"))
                   for s in range(h)]
        for j in range(h):
            acc = torch.zeros(d * c)
            for s in range(h):
                acc = acc + arrived[s][j]
            partial[node * h + j] = acc
    out = {}
    for j in range(h):
        if d == 1:
            out[j] = partial[j].view(-1).clone()
            continue
        arrived = [sent(list(partial[src * h + j].view(d, c)), loco, (name, src * h + j, "inter")) for src in range(d)]
        for node in range(d):
            acc = torch.zeros(c)
            for src in range(d):
                acc = acc + arrived[src][node]
            out[node * h + j] = acc
    return out


def reference(world, quantized, qgz_hpz=0, loco=None, shard_group=None):
    """torch's run; with qgz_hpz (> 0: the node size), each rank's gradient reduced as qgZ does
    (with loco = (err_beta, reset_T), with LoCo's error feedback); quantized weights are cut into
    chunks for shard_group ranks (default: all)."""
    if qgz_hpz:
        return reference_qgz(world, qgz_hpz, loco)
    return reference_plain(world, quantized, shard_group or world)


def reference_qgz(world, hpz, loco=None):
    model = Odd()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    params = dict(model.named_parameters())
    losses = []
    state = {"beta": loco[0], "errors": {}} if loco else None
    for step in range(STEPS):
        if loco and step % loco[1] == 0:  # every reset_T-th reduction starts from zero
            state["errors"] = {}
        local, step_loss = [], 0.0
        for r in range(world):
            model.zero_grad()
            loss = model(*[t[r::world] for t in batch(step)])
            loss.backward()
            step_loss += loss.item()
            local.append({n: p.grad.detach().reshape(-1).clone() for n, p in params.items()})
        for n, p in params.items():
            numel = p.numel()
            c = -(-numel // world)
            padded = [torch.cat([g[n], g[n].new_zeros(c * world - numel)]) for g in local]
            if p.dim() >= 2:
                chunks = qgz_reduce(padded, world, hpz, state, n)
                whole = torch.cat([chunks[r] for r in range(world)])[:numel]
            else:  # 1-D gradients (biases, gains) are reduce-scattered exactly, as DeepSpeed's
                whole = sum(padded)[:numel]
            p.grad = (whole * (1.0 / world)).view_as(p)
        if step == 0:
            grads = {n: p.grad.clone() for n, p in params.items()}
        opt.step()
        losses.append(step_loss / world)
    return losses, grads, {n: p.detach().clone() for n, p in params.items()}


def reference_plain(world, quantized, shard_group):
    model = Odd()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    losses = []
    for step in range(STEPS):
        exact = {n: p.detach().clone() for n, p in model.named_parameters()}
        if quantized:
            with torch.no_grad():
                for p in model.parameters():
                    p.copy_(qwz(p, shard_group))
        opt.zero_grad()
        # each rank's share of the batch, averaged as the engine averages over data ranks
        loss = sum(model(*[t[r::world] for t in batch(step)]) for r in range(world)) / world
        loss.backward()
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(exact[n])
        if step == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        losses.append(loss.item())
    return losses, grads, {n: p.detach().clone() for n, p in model.named_parameters()}


def run(world, rank, quantized, hpz=1, counts=None, qgz=False, loco=None, resume_at=None, where=None, mics=-1,
        offload=False):
    """The engine's run; with loco = (err_beta, reset_T), qgZ with LoCo; with resume_at, a checkpoint
    saved after that many steps (in `where`) is loaded into a fresh engine, which runs the rest; with
    mics > 0, MiCS with shard groups of that many ranks; with offload, the shard (and hpZ's copy) in
    host memory (offload_param device cpu)."""
    def engine_of():
        z = {"stage": 3, "stage3_param_persistence_threshold": 0, "stage3_max_reuse_distance": 0,
             "zero_quantized_weights": quantized, "zero_hpz_partition_size": hpz, "zero_quantized_gradients": qgz,
             "mics_shard_size": mics}
        if loco:
            z["zeropp_loco_param"] = {"err_beta": loco[0], "reset_T": loco[1]}
        if offload:
            z["offload_param"] = {"device": "cpu"}
        cfg = {"train_micro_batch_size_per_gpu": B // world, "gradient_accumulation_steps": 1, "steps_per_print": 1000,
               "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.0}},
               # parameters released after use and gathered again in backward: the gather hpZ keeps on the node
               "zero_optimization": z, "comms_timeout_s": 60, "comms_logger": {"enabled": counts is not None}}
        engine, *_ = zeal.initialize(model=Odd(), config=cfg)
        return engine

    engine = engine_of()
    inner = mics if mics > 0 else hpz
    check(engine._core.mesh.mesh.axis_size("data_inner") == inner, f"data_inner axis {inner} (hpZ {hpz}, MiCS {mics})")
    # each rank keeps 1/(shard group) of every parameter (padded): MiCS's shard groups, else every rank
    group = mics if mics > 0 else world
    want = sum(-(-p.numel() // group) for p in Odd().parameters())
    check(engine._core.master_numel == want, f"master elements {engine._core.master_numel}, want {want} "
          f"(parameters sharded over {group} ranks)")
    losses = []
    for step in range(STEPS):
        if step == resume_at:
            engine.save_checkpoint(where, tag="resume")
            engine = engine_of()
            engine.load_checkpoint(where, tag="resume")
        mine = [t[rank::world] for t in batch(step)]
        loss = engine(*mine)
        engine.backward(loss)
        if step == 0:
            grads = {n: zeal.utils.safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}
        engine.step()
        total = torch.tensor([loss.item()])
        zeal.world().all_reduce(total, "sum").wait()
        losses.append(total.item() / world)
    final = {n: zeal.utils.safe_get_full_fp32_param(p).clone() for n, p in engine.module.named_parameters()}
    if counts is not None:
        counts.update(engine.comms_log_summary(show=False), step=engine.comms_step_bytes())
    return losses, grads, final


def compare(got, want, what):
    g_losses, g_grads, g_final = got
    w_losses, w_grads, w_final = want
    for step, (a, b) in enumerate(zip(g_losses, w_losses)):
        close(torch.tensor(a), torch.tensor(b), f"{what}: loss of step {step}")
    for n in w_grads:
        close(g_grads[n].reshape(-1), w_grads[n].reshape(-1), f"{what}: first gradient of {n}")
        close(g_final[n].reshape(-1), w_final[n].reshape(-1), f"{what}: final {n}")


def check_checkpoints(world, hpz, where, mics=-1):
    """A checkpoint saved with qwZ + qgZ (+ hpZ) loads into plain ZeRO-3 and the reverse, value for
    value: the master weights and the optimizer state are never quantized. With mics > 0, the same
    between MiCS (shard groups of mics ranks, the first of which writes) and plain ZeRO-3."""
    def engine_of(zeropp):
        z = {"stage": 3, "stage3_param_persistence_threshold": 0}
        if zeropp and mics > 0:
            z.update(mics_shard_size=mics)
        elif zeropp:
            z.update(zero_quantized_weights=True, zero_quantized_gradients=True, zero_hpz_partition_size=hpz)
        cfg = {"train_micro_batch_size_per_gpu": B // world.size, "steps_per_print": 1000,
               "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.0}}, "zero_optimization": z}
        engine, *_ = zeal.initialize(model=Odd(), config=cfg)
        return engine

    for saved_with, loaded_with in ((True, False), (False, True)):
        src = engine_of(saved_with)
        for step in range(2):
            src.backward(src(*[t[world.rank::world.size] for t in batch(step)]))
            src.step()
        tag = f"{'mics' if mics > 0 else 'zeropp'}{int(saved_with)}"
        src.save_checkpoint(where, tag=tag)
        want = {n: zeal.utils.safe_get_full_fp32_param(p).clone() for n, p in src.module.named_parameters()}
        dst = engine_of(loaded_with)
        dst.load_checkpoint(where, tag=tag)
        for n, p in dst.module.named_parameters():
            got = zeal.utils.safe_get_full_fp32_param(p)
            check(torch.equal(got, want[n]), f"{n} after loading a ZeRO++={saved_with} checkpoint with ZeRO++={loaded_with}")
        # and both go on alike: one more step each on the same batch
        for e in (src, dst):
            e.backward(e(*[t[world.rank::world.size] for t in batch(9)]))
            e.step()
        if not (saved_with or loaded_with):
            continue
        for (n, a), (_, b) in zip(src.module.named_parameters(), dst.module.named_parameters()):
            a, b = zeal.utils.safe_get_full_fp32_param(a), zeal.utils.safe_get_full_fp32_param(b)
            check(torch.isfinite(b).all() and (a - b).abs().max() < 0.1, f"{n} after a step from the loaded checkpoint")


def check_bytes(world, hpz):
    """With nodes of hpz ranks (ZEAL_RANKS_PER_NODE), the comms_logger's split of each rank's bytes:
    plain ZeRO-3's all_gathers send twice as much off the node as on it at 2 nodes of 2 (the
    accounting itself). This model's parameters are gathered once a step; plain ZeRO-3 sends each
    chunk to the 2 ranks of the other node, hpZ's secondary build to 1 and its node-local gathers to
    none, so hpZ's all_gathers send at most 0.6 of plain ZeRO-3's bytes off the node (the rest: the
    agreement tokens, which still go to every rank); the gradient
    reduce_scatter is the same."""
    import os

    os.environ["ZEAL_RANKS_PER_NODE"] = str(hpz)
    plain, hier = {}, {}
    run(world.size, world.rank, False, 1, plain)
    run(world.size, world.rank, False, hpz, hier)
    ag, hag = plain["all_gather"], hier["all_gather"]
    check(ag["inter_node_bytes"] == 2 * ag["intra_node_bytes"] > 0,
          f"plain ZeRO-3 all_gather bytes: {ag['intra_node_bytes']} on the node, {ag['inter_node_bytes']} off it")
    check(hag["inter_node_bytes"] <= 0.6 * ag["inter_node_bytes"],
          f"hpZ all_gather bytes off the node {hag['inter_node_bytes']}, plain {ag['inter_node_bytes']}")
    check(hier["reduce_scatter"] == plain["reduce_scatter"], f"reduce_scatter {hier['reduce_scatter']} / {plain['reduce_scatter']}")
    check(hier["step"]["inter_node"] < plain["step"]["inter_node"], f"per step {hier['step']} / {plain['step']}")
    if world.rank == 0:
        print(f"all_gather calls: plain {ag['calls']}, hpZ {hag['calls']}; bytes off the node: plain {ag['inter_node_bytes']}, hpZ {hag['inter_node_bytes']}; "
              f"last step: plain {plain['step']}, hpZ {hier['step']}", flush=True)


def check_mics_bytes(world, mics):
    """With nodes of `mics` ranks (ZEAL_RANKS_PER_NODE) and MiCS shard groups of the same size, the
    parameters' all-gathers never leave the node, and the replicas' gradient all-reduce is what
    crosses (the comms logger counts every group the engine uses)."""
    import os

    os.environ["ZEAL_RANKS_PER_NODE"] = str(mics)
    counts = {}
    run(world.size, world.rank, False, counts=counts, mics=mics)
    ag, ar = counts["all_gather"], counts.get("all_reduce", {"inter_node_bytes": 0})
    check(ag["inter_node_bytes"] == 0 < ag["intra_node_bytes"],
          f"MiCS all_gather bytes: {ag['intra_node_bytes']} on the node, {ag['inter_node_bytes']} off it")
    check(ar["inter_node_bytes"] > 0 and counts["step"]["inter_node"] > 0,
          f"MiCS: the replicas' all_reduce must cross nodes ({ar}, last step {counts['step']})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hpz", type=int, default=1, help="also run hpZ with this secondary partition size")
    ap.add_argument("--checkpoints", help="a directory every rank sees: check ZeRO++ checkpoints load without it")
    ap.add_argument("--mics", type=int, default=-1, help="also run MiCS with shard groups of this many ranks")
    args = ap.parse_args()
    world = zeal.world()
    exact, quantized = reference(world.size, False), reference(world.size, True)
    differ = max((quantized[2][n] - exact[2][n]).abs().max().item() for n in exact[2])
    check(differ > 1e-4, f"the quantized reference should move away from the exact one (max {differ:.2e})")
    compare(run(world.size, world.rank, True), quantized, f"qwZ at {world.size} ranks")
    compare(run(world.size, world.rank, False), exact, f"ZeRO-3 without qwZ at {world.size} ranks")
    if args.hpz > 1:  # hpZ alone is exact
        compare(run(world.size, world.rank, False, args.hpz), exact, f"hpZ {args.hpz} at {world.size} ranks")
        compare(run(world.size, world.rank, True, args.hpz), quantized, f"qwZ + hpZ {args.hpz} at {world.size} ranks")
        compare(run(world.size, world.rank, False, args.hpz, offload=True), exact,
                f"hpZ {args.hpz} + offload_param cpu at {world.size} ranks")
        compare(run(world.size, world.rank, True, args.hpz, offload=True), quantized,
                f"qwZ + hpZ {args.hpz} + offload_param cpu at {world.size} ranks")
    if args.hpz > 1 and world.size > args.hpz:
        check_bytes(world, args.hpz)
    if args.checkpoints:
        check_checkpoints(world, args.hpz, args.checkpoints)
    if args.mics > 0:  # MiCS is exact too, alone and with qwZ within its shard groups
        compare(run(world.size, world.rank, False, mics=args.mics), exact, f"MiCS {args.mics} at {world.size} ranks")
        # (a shard group of one rank gathers nothing, so nothing is quantized)
        compare(run(world.size, world.rank, True, mics=args.mics),
                reference(world.size, args.mics > 1, shard_group=args.mics), f"MiCS {args.mics} + qwZ at {world.size} ranks")
        if args.checkpoints:
            check_checkpoints(world, args.hpz, args.checkpoints, mics=args.mics)
        if world.size > args.mics > 1:
            check_mics_bytes(world, args.mics)
    # qgZ: one level over every rank, and hierarchical over nodes of --hpz ranks
    for hpz in sorted({1, args.hpz}):
        want = reference(world.size, False, qgz_hpz=hpz)
        differ = max((want[2][n] - exact[2][n]).abs().max().item() for n in exact[2])
        check(differ > 1e-4, f"the qgZ reference should move away from the exact one (max {differ:.2e})")
        compare(run(world.size, world.rank, False, hpz, qgz=True), want, f"qgZ over nodes of {hpz} at {world.size} ranks")
        check_loco(world, hpz, want, args.checkpoints)
    print(f"ZEROPP-OK rank {world.rank}", flush=True)


def spread(a, b):
    return max((a[2][n] - b[2][n]).abs().max().item() for n in a[2])


def check_loco(world, hpz, qgz, where):
    """qgZ with LoCo equals the reference that carries each rank's errors from step to step; every
    reset_T-th step starts from zero; a checkpoint brings the errors back. Controls: LoCo's reference
    differs from plain qgZ's, and one reset midway differs from none (so the resumed run, which
    equals the uninterrupted one, could not equal it had the errors been lost in the checkpoint)."""
    what = f"over nodes of {hpz} at {world.size} ranks"
    loco = reference(world.size, False, qgz_hpz=hpz, loco=(0.8, 1024))
    check(spread(loco, qgz) > 1e-6, f"LoCo's reference should differ from plain qgZ's {what} ({spread(loco, qgz):.2e})")
    compare(run(world.size, world.rank, False, hpz, qgz=True, loco=(0.8, 1024)), loco, f"qgZ + LoCo {what}")
    reset = reference(world.size, False, qgz_hpz=hpz, loco=(0.8, 3))
    check(spread(reset, loco) > 1e-6, f"a LoCo reset at step 3 should change the reference {what}")
    compare(run(world.size, world.rank, False, hpz, qgz=True, loco=(0.8, 3)), reset, f"qgZ + LoCo reset every 3 {what}")
    if where:
        compare(run(world.size, world.rank, False, hpz, qgz=True, loco=(0.8, 1024), resume_at=3, where=where), loco,
                f"qgZ + LoCo resumed from a checkpoint after 3 steps {what}")


if __name__ == "__main__":
    main()
