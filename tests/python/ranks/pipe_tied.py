"""A pipeline whose first and last stages share an embedding (TiedLayerSpec, the output head
multiplying by its transpose), against one torch process with the embedding shared the usual
way. Every step's loss, and at the end every stage's weights (both copies of the tied embedding
included), must match to 1e-5 relative."""
import argparse

import torch

import zeal
from zeal.pipe import LayerSpec, PipelineModule, TiedLayerSpec

VOCAB, DIM, HIDDEN, SEQ, LR, WD = 24, 12, 32, 5, 1e-2, 0.01


def head(embedding, x):
    return x @ embedding.weight.t()


def layers():
    return [TiedLayerSpec("embed", torch.nn.Embedding, VOCAB, DIM), LayerSpec(torch.nn.Linear, DIM, HIDDEN),
            torch.nn.GELU(), LayerSpec(torch.nn.Linear, HIDDEN, DIM), LayerSpec(torch.nn.LayerNorm, DIM),
            TiedLayerSpec("embed", torch.nn.Embedding, VOCAB, DIM, forward_fn=head)]


def loss_fn(logits, targets):
    return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


class Reference(torch.nn.Module):
    def __init__(self):
        super().__init__()
        built = []
        for i, layer in enumerate(layers()[:-1]):
            if isinstance(layer, LayerSpec):
                torch.manual_seed(1234 + i)
                layer = layer.build()
            built.append(layer)
        self.body = torch.nn.Sequential(*built)

    def forward(self, ids):
        return head(self.body[0], self.body(ids))


def batch(step, rows):
    g = torch.Generator().manual_seed(900 + step)
    ids = torch.randint(0, VOCAB, (rows, SEQ), generator=g)
    return ids, torch.roll(ids, -1, dims=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stages", type=int, required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--gas", type=int, default=3)
    ap.add_argument("--zero", type=int, default=0)
    ap.add_argument("--clip", type=float, default=0.0)
    args = ap.parse_args()
    world = zeal.world()
    module = PipelineModule(layers(), num_stages=args.stages, loss_fn=loss_fn, partition_method="uniform")
    config = {"train_micro_batch_size_per_gpu": args.micro, "gradient_accumulation_steps": args.gas,
              "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": WD}}, "gradient_clipping": args.clip,
              "zero_optimization": {"stage": args.zero, "reduce_bucket_size": 200}, "steps_per_print": 1000,
              "comms_timeout_s": 60}
    engine, *_ = zeal.initialize(model=module, config=config)
    ref = Reference()
    opt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=WD)
    dp = world.size // args.stages
    d = module.topology.group_of("data", world.rank).index(world.rank)
    for step in range(args.steps):
        ids, targets = batch(step, args.micro * args.gas * dp)
        micro = [slice((k * dp + d) * args.micro, (k * dp + d + 1) * args.micro) for k in range(args.gas)]
        loss = engine.train_batch(iter([(ids[r], targets[r]) for r in micro])).double().reshape(1)
        engine.data_comm.all_reduce(loss, "sum").wait()
        want = loss_fn(ref(ids), targets)
        opt.zero_grad()
        want.backward()
        if args.clip:
            torch.nn.utils.clip_grad_norm_(ref.parameters(), args.clip)
        opt.step()
        assert abs(loss.item() / dp - want.item()) <= 1e-5 * want.item(), (step, loss.item() / dp, want.item())
    # This stage's untied modules, in layer order, against the reference's; the tied embedding (on
    # the first and the last stage, each its own copy) against the reference's one.
    last = len(layers()) - 1
    indices = [i for begin, end in module.chunk_layers for i in range(begin, end) if i not in (0, last)]
    want = [p for i in indices if isinstance(ref.body[i], torch.nn.Module) for p in ref.body[i].parameters()]
    got = [p for m in module.stage_layers for p in m.parameters()]
    if "embed" in module.tied_modules:
        got.append(module.tied_modules["embed"].weight)
        want.append(ref.body[0].weight)
    assert len(got) == len(want) and got, (len(got), len(want))
    for g, w in zip(got, want):
        rel = ((g.detach() - w.detach()).abs().max() / w.detach().abs().max()).item()
        assert rel <= 1e-5, (world.rank, tuple(g.shape), rel)
    print(f"TIED-OK rank {world.rank} stage {module.stage_id}", flush=True)


if __name__ == "__main__":
    main()
