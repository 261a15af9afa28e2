"""One rank of a 4-rank job on the mesh data 2 x sequence 2 (rank = 2 * data + sequence): the groups
the mesh cuts, and engines whose reduction and norm groups come from their parameters' placement.

- dense: every parameter replicated (the default placement): its gradient reduces over
  data*sequence, all 4 ranks; the run must equal one torch process on the 4 ranks' batches.
- split: every parameter split over sequence (each sequence rank holds its own half of the model,
  as a tensor-parallel slice would be): gradients reduce over data only ({s, 2 + s}), and the
  gradient norm that clipping uses is summed over both halves (the complement of data). The
  reference is two torch models trained on their data pairs' batches, clipped by their joint norm.
- mixed: one model with both (the first layer's weight split over sequence, the rest dense): two
  sharded-state units in one engine, equal to torch with each gradient averaged over its own group
  and clipped by the joint norm; the same on a data x expert mesh with the weight tagged as an
  expert's; its checkpoint is refused by name (the split weight has one name on both ranks).
- zero.Init over the data group partitions the split model as the engine does; over the world it
  is refused by parameter name.
Each at ZeRO 0-3, fp32, 1e-5 relative. Prints MESH-OK from every rank that checked everything."""
import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import check, close  # noqa: E402
import zeal  # noqa: E402

LR, STEPS, MICRO, CLIP = 1e-2, 3, 2, 0.05


def mlp(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))


def batch(step, rank):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(MICRO, 6, generator=g), torch.randn(MICRO, 3, generator=g)


def loss_fn(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def config(stage):
    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1, "steps_per_print": 1000,
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.0}}, "gradient_clipping": CLIP,
            "zero_optimization": {"stage": stage, "reduce_bucket_size": 50,
                                  "stage3_param_persistence_threshold": 0}, "comms_timeout_s": 60}


def train(model, groups, stage):
    engine, *_ = zeal.initialize(model=model, config=config(stage), data_parallel_group=groups.group("data"))
    for step in range(STEPS):
        x, y = batch(step, groups.rank)
        engine.backward(loss_fn(engine, x, y))
        engine.step()
    return engine


def full_params(engine):
    """Every parameter's whole fp32 master value, whatever the stage (collective)."""
    return [zeal.utils.safe_get_full_fp32_param(p) for p in engine.module.parameters()]


def split_reference():
    """Sequence rank s's model s, trained on its data pair's batches, clipped by the joint norm."""
    refs = [mlp(10 + s) for s in range(2)]
    opts = [torch.optim.AdamW(m.parameters(), lr=LR, weight_decay=0.0) for m in refs]
    for step in range(STEPS):
        for s in range(2):
            opts[s].zero_grad()
            sum(loss_fn(refs[s], *batch(step, 2 * d + s)) for d in range(2)).div(2).backward()
        torch.nn.utils.clip_grad_norm_([p for m in refs for p in m.parameters()], CLIP)
        for o in opts:
            o.step()
    return refs


def mixed_reference(expert=False):
    """Models 0 and 1 sharing every parameter but the first weight W_s, trained on all four ranks'
    batches (rank r uses model r % 2); the others' gradient is the mean over all four. W_s split over
    sequence: the mean over its pair (sequence ranks share samples). W_s an expert's: the gradient of
    the mean over all four ranks' losses (Note [Expert gradients])."""
    refs = [mlp(0), mlp(0)]
    for name in ("0.bias", "2.weight", "2.bias"):
        layer, attr = name.split(".")
        setattr(refs[1][int(layer)], attr, getattr(refs[0][int(layer)], attr))
    for s in range(2):
        torch.manual_seed(20 + s)
        refs[s][0].weight.data = torch.randn(12, 6) * 0.3
    unique = [refs[0][0].weight, refs[1][0].weight, refs[0][0].bias, refs[0][2].weight, refs[0][2].bias]
    opt = torch.optim.AdamW(unique, lr=LR, weight_decay=0.0)
    for step in range(STEPS):
        opt.zero_grad()
        sum(loss_fn(refs[r % 2], *batch(step, r)) for r in range(4)).div(4).backward()
        for s in range(2 if not expert else 0):
            refs[s][0].weight.grad.mul_(2)  # the mean over 2 ranks, not a quarter of their sum
        torch.nn.utils.clip_grad_norm_(unique, CLIP)
        opt.step()
    return refs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stages", default="0,1,2,3")
    ap.add_argument("--tmp", required=True, help="a directory every rank sees")
    args = ap.parse_args()
    world = zeal.world()
    check(world.size == 4, "run on 4 ranks")
    groups = zeal.mesh.build(sequence=2)
    check(zeal.mesh.build(sequence=2) is groups, "the same shape must give the same groups (cut once)")
    mesh, rank = groups.mesh, world.rank
    check(mesh.axes == [("data", 2), ("sequence", 2)], f"mesh axes {mesh.axes}")
    # Every group sums the world ranks of exactly the ranks the mesh names.
    for axes in (["data"], ["sequence"], ["data", "sequence"], []):
        t = torch.tensor([float(rank)])
        groups.group(axes).all_reduce(t, "sum").wait()
        check(t.item() == sum(mesh.group_of(axes, rank)), f"group {axes}: {t.item()} != {mesh.group_of(axes, rank)}")
        check(groups.group(axes) == groups.group(axes), "a group is cut once")
    check(zeal._zeal.reduction_axes(mesh) == ["data", "sequence"], "dense weights reduce over data*sequence")
    check(zeal._zeal.reduction_axes(mesh, ["sequence"]) == ["data"], "sequence-split weights reduce over data")
    seq = mesh.coord(rank, "sequence")

    for stage in map(int, args.stages.split(",")):
        # dense: one torch process on all four ranks' batches (the mean over ranks of the means).
        ref = mlp(0)
        opt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=0.0)
        for step in range(STEPS):
            opt.zero_grad()
            sum(loss_fn(ref, *batch(step, r)) for r in range(4)).div(4).backward()
            torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)
            opt.step()
        engine = train(mlp(0), groups, stage)
        check(engine._core.reduction_axes == ["data", "sequence"], f"dense: {engine._core.reduction_axes}")
        check(engine._core.world_size == 4, "dense weights reduce over all 4 ranks")
        for (name, want), got in zip(ref.named_parameters(), full_params(engine)):
            close(got, want.detach(), f"stage {stage} dense {name}")

        # split over sequence: sequence rank s holds model s; both trained on their data pair's
        # batches, clipped by the norm of the two together.
        refs = split_reference()
        model = mlp(10 + seq)
        for p in model.parameters():
            p.zeal_split_axes = ("sequence",)
        engine = train(model, groups, stage)
        check(engine._core.reduction_axes == ["data"], f"split: {engine._core.reduction_axes}")
        for (name, want), got in zip(refs[seq].named_parameters(), full_params(engine)):
            close(got, want.detach(), f"stage {stage} split {name}")

        # Two reduction groups in one engine (Note [Sharded-state units]): the first layer's weight is
        # split over sequence (sequence rank s holds its own W_s, reduced over data), the rest are
        # dense (reduced over data*sequence). Reference: one torch model per sequence rank sharing
        # every parameter but W_s, on all four ranks' batches; each gradient is the mean over its
        # own reduction group (the dense ones over 4 ranks, W_s over its data pair), clipped by
        # the norm of every distinct value once. The same model on a data 2 x expert 2 mesh, W
        # tagged split over expert (an expert weight): the same units and the same numbers, the
        # only difference being that expert ranks see different samples (Note [Samples per step]).
        refs_of = {"sequence": mixed_reference(), "expert": mixed_reference(expert=True)}
        for axis, mixed_groups, samples in (("sequence", groups, 2), ("expert", zeal.mesh.build(expert=2), 4)):
            refs = refs_of[axis]
            coord = mixed_groups.mesh.coord(rank, axis)
            check(coord == seq, f"{axis} coordinate {coord} of rank {rank}")
            model = mlp(0)
            torch.manual_seed(20 + coord)
            model[0].weight.data = torch.randn(12, 6) * 0.3
            model[0].weight.zeal_split_axes = (axis,)
            engine = train(model, mixed_groups, stage)
            units = engine._core.units
            check([(axes, size) for axes, size, _ in units] == [(["data"], 2), (["data", axis], 4)],
                  f"mixed over {axis}: units {units}")
            check(units[0][2] == [0] and units[1][2] == [1, 2, 3], f"mixed over {axis}: unit members {units}")
            check(engine._core.reduction_axes == ["data", axis], "the batch's group is the dense weights'")
            check(engine.train_batch_size() == MICRO * samples, f"mixed over {axis}: train batch "
                  f"{engine.train_batch_size()}")
            for (name, want), got in zip(refs[coord].named_parameters(), full_params(engine)):
                close(got, want.detach(), f"stage {stage} mixed over {axis} {name}")
            if stage < 3:
                # The live parameters are the published master values (views of each unit's flat buffer).
                for (name, want), got in zip(refs[coord].named_parameters(), engine.module.parameters()):
                    close(got.detach(), want.detach(), f"stage {stage} mixed over {axis} live {name}")

    # zero.Init partitions over the group it is given: the sequence-split model built under
    # Init(data_parallel_group=data) trains at stage 3 equal to torch; built under Init over the
    # world (all 4 ranks) its parameters are refused by name (chunks cut over the wrong ranks).
    refs = split_reference()
    with zeal.zero.Init(data_parallel_group=groups.group("data"), config_dict_or_path=config(3)):
        model = mlp(10 + seq)
    check(all(p.numel() == 0 for p in model.parameters()), "zero.Init left a parameter whole")
    for p in model.parameters():
        p.zeal_split_axes = ("sequence",)
    engine = train(model, groups, 3)
    for (name, want), got in zip(refs[seq].named_parameters(), full_params(engine)):
        close(got, want.detach(), f"zero.Init over data, split {name}")
    with zeal.zero.Init(config_dict_or_path=config(3)):
        model = mlp(10 + seq)
    for p in model.parameters():
        p.zeal_split_axes = ("sequence",)
    try:
        zeal.initialize(model=model, config=config(3), data_parallel_group=groups.group("data"))
        check(False, "chunks cut over the world were accepted for parameters reduced over data")
    except zeal.Error as e:
        check("was partitioned by zeal.zero.Init over world ranks [0, 1, 2, 3]" in str(e) and "'0.weight'" in str(e),
              f"message: {e}")

    # A checkpoint of an engine with two units is saved in parts (one per unit and group), but a
    # weight split over sequence under the same name on both sequence ranks could not be told apart
    # in it: refused by name, before anything is written.
    model = mlp(0)
    model[0].weight.zeal_split_axes = ("sequence",)
    engine, *_ = zeal.initialize(model=model, config=config(0), data_parallel_group=groups.group("data"))
    save_dir = Path(args.tmp) / "two-units"
    try:
        engine.save_checkpoint(str(save_dir), tag="t")
        check(False, "a checkpoint of same-named split weights was accepted")
    except zeal.Error as e:
        check("parameter '0.weight' is split over sequence" in str(e) and "same name" in str(e), f"message: {e}")
    check(not (save_dir / "t").exists(), "a refused save left a checkpoint directory")
    print(f"MESH-OK rank {rank}", flush=True)


if __name__ == "__main__":
    main()
