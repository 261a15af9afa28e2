"""One rank of a pipeline-parallel run (zeal.pipe) against a single-process torch run of the same
layers, seeds, data and optimizer: every step's loss, then eval_batch's loss on a fresh batch, and
at the end every stage's parameters must agree (fp32: 1e-5 relative). Prints PIPE-OK from every
rank that checked."""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
import zeal  # noqa: E402
from zeal.pipe import LayerSpec, PipelineModule  # noqa: E402

LR, WD = 1e-2, 0.01


def layers(tp_group=None):
    """The model's layers; with a tensor group, layers 2 and 5 are column- and row-parallel."""
    h = common.HIDDEN
    second = LayerSpec(torch.nn.Linear, h, h)
    fifth = LayerSpec(torch.nn.Linear, h, h)
    if tp_group is not None:
        from zeal import tensor_parallel as tp

        second = LayerSpec(tp.ColumnParallelLinear, h, h, gather_output=True, group=tp_group)
        fifth = LayerSpec(tp.RowParallelLinear, h, h, group=tp_group)
    return [LayerSpec(torch.nn.Linear, common.IN, h), torch.nn.Tanh(), second,
            torch.nn.GELU(), LayerSpec(torch.nn.LayerNorm, h), fifth, torch.nn.Tanh(),
            LayerSpec(torch.nn.Linear, h, common.OUT)]


def reference(steps, batch, clip):
    """The same layers in one process, built with the same per-layer seeds."""
    built = []
    for i, layer in enumerate(layers()):
        if isinstance(layer, LayerSpec):
            torch.manual_seed(1234 + i)
            layer = layer.build()
        built.append(layer)
    model = torch.nn.Sequential(*built)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    losses = []
    for step in range(steps):
        x, y = common.global_batch(step, batch)
        loss = common.loss_fn(model(x), y)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return built, losses


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stages", type=int, required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--gas", type=int, default=4, help="micro-batches per global batch")
    ap.add_argument("--schedule", default="1f1b")
    ap.add_argument("--zero", type=int, default=0)
    ap.add_argument("--partition", default="parameters")
    ap.add_argument("--checkpoint_interval", type=int, default=0)
    ap.add_argument("--clip", type=float, default=0.0)
    ap.add_argument("--chunks", type=int, default=1, help="chunks_per_stage (interleaved schedule)")
    ap.add_argument("--tensor", type=int, default=1, help="tensor-parallel size (3D: pipe x data x tensor)")
    ap.add_argument("--raise_at", default="", help="STEP:STAGE: that stage raises in forward at that step")
    ap.add_argument("--timeout", type=float, default=60)
    ap.add_argument("--save_at", type=int, default=0, help="save a checkpoint after this many steps")
    ap.add_argument("--save_dir", default="")
    ap.add_argument("--load", default="", help="resume from this checkpoint directory (its latest tag)")
    args = ap.parse_args()

    world = zeal.world()
    topology, tp_group = None, None
    if args.tensor > 1:
        topology = zeal._zeal.Mesh([("pipe", args.stages), ("data", world.size // (args.stages * args.tensor)),
                                        ("tensor", args.tensor)])
        tp_group = zeal.mesh.of(topology, world).group("tensor")
    module = PipelineModule(layers(tp_group), num_stages=args.stages, topology=topology, loss_fn=common.loss_fn,
                            partition_method=args.partition, activation_checkpoint_interval=args.checkpoint_interval,
                            chunks_per_stage=args.chunks)
    config = {"train_micro_batch_size_per_gpu": args.micro, "gradient_accumulation_steps": args.gas,
              "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": WD}},
              "zero_optimization": {"stage": args.zero, "reduce_bucket_size": 500},
              "pipeline": {"schedule": args.schedule if args.chunks == 1 else "interleaved"}, "steps_per_print": 1000, "comms_timeout_s": args.timeout,
              "gradient_clipping": args.clip}
    engine, *_ = zeal.initialize(model=module, config=config)
    data_size = world.size // (args.stages * args.tensor)
    data_index = module.topology.group_of("data", world.rank).index(world.rank)
    batch = args.micro * args.gas * data_size
    want_params, want_losses = reference(args.steps, batch, args.clip)
    if args.raise_at:
        bad_step, bad_stage = map(int, args.raise_at.split(":"))
        if module.stage_id == bad_stage:
            def hook(_module, _inputs):
                if engine.global_steps == bad_step:
                    raise RuntimeError(f"injected failure in stage {bad_stage} at step {bad_step}")
            module.register_forward_pre_hook(hook)
    start = 0
    if args.load:
        _, client = engine.load_checkpoint(args.load)
        start = engine.global_steps
        assert client == {"next_step": start}, client
    for step in range(start, args.steps):
        x, y = common.global_batch(step, batch)
        rows = [common.micro_slice(step, k, data_index, data_size, args.micro) for k in range(args.gas)]
        loss = engine.train_batch(iter([(x[r], y[r]) for r in rows]))
        # Each data-parallel replica reports its own micro-batches' mean; their mean is the reference's.
        mean = loss.double().reshape(1)
        engine.data_comm.all_reduce(mean, "sum").wait()
        mean = mean.item() / data_size
        assert abs(mean - want_losses[step]) <= 1e-5 * abs(want_losses[step]), (step, mean, want_losses[step])
        if args.save_at and engine.global_steps == args.save_at:
            engine.save_checkpoint(args.save_dir, client_state={"next_step": engine.global_steps})
            print(f"SAVED step {engine.global_steps}", flush=True)
            return
    # eval_batch on a fresh batch: forwards only (the interleaved order with chunks), the mean loss
    # of the trained model, and no change to the weights (checked below).
    x, y = common.global_batch(args.steps, batch)
    rows = [common.micro_slice(args.steps, k, data_index, data_size, args.micro) for k in range(args.gas)]
    got_eval = engine.eval_batch(iter([(x[r], y[r]) for r in rows])).double().reshape(1)
    engine.data_comm.all_reduce(got_eval, "sum").wait()
    with torch.no_grad():
        want_eval = common.loss_fn(torch.nn.Sequential(*want_params)(x), y).item()
    assert abs(got_eval.item() / data_size - want_eval) <= 1e-5 * abs(want_eval), (got_eval.item(), want_eval)
    want = [p for begin, end in module.chunk_layers for layer in want_params[begin:end]
            if isinstance(layer, torch.nn.Module) for p in layer.parameters()]
    got = list(module.parameters())
    assert len(got) == len(want), (len(got), len(want))
    for g, w in zip(got, want):
        if getattr(g, "tensor_parallel", False):
            size = g.shape[g.partition_dim]
            w = w.narrow(g.partition_dim, tp_group.rank * size, size)
        rel = ((g.detach() - w.detach()).abs().max() / w.detach().abs().max()).item()
        assert rel <= 1e-5, (module.stage_id, rel)
    print(f"PIPE-OK rank {world.rank} stage {module.stage_id} layers {module.chunk_layers}", flush=True)


if __name__ == "__main__":
    main()
