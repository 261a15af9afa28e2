"""One rank of a tensor-parallel run (zeal.tensor_parallel, optionally x data parallel) against one
torch process: a small language model (vocabulary-parallel embedding, a column-then-row parallel
MLP, a vocabulary-parallel head and cross-entropy) trained 10 steps with AdamW. Every step's loss
and every final shard must match the single-process model's (fp32: 1e-5 relative). With --save_at /
--load, a run saves and a later one, at another layout, resumes: its losses and shards still follow
the uninterrupted torch run."""
import argparse
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import zeal  # noqa: E402
from zeal import tensor_parallel as tp  # noqa: E402

VOCAB, DIM, HIDDEN, SEQ, LR, WD = 32, 16, 64, 8, 1e-2, 0.01


class Model(torch.nn.Module):
    """The same layers whole (group=None, plain torch) or tensor-parallel (a group)."""

    def __init__(self, group=None, sequence_parallel=False):
        super().__init__()
        self.group = group
        sp = {"sequence_parallel": sequence_parallel}
        if group is None:
            self.embed = torch.nn.Embedding(VOCAB, DIM)
            self.up = torch.nn.Linear(DIM, HIDDEN)
            self.down = torch.nn.Linear(HIDDEN, DIM)
            self.head = torch.nn.Linear(DIM, VOCAB)
        else:
            self.embed = tp.VocabParallelEmbedding(VOCAB, DIM, group=group, **sp)
            self.up = tp.ColumnParallelLinear(DIM, HIDDEN, gather_output=False, group=group, **sp)
            self.down = tp.RowParallelLinear(HIDDEN, DIM, input_is_parallel=True, group=group, **sp)
            self.head = tp.ColumnParallelLinear(DIM, VOCAB, gather_output=False, group=group, **sp)
        self.norm = torch.nn.LayerNorm(DIM)
        if sequence_parallel:  # the norm and the residual add work on each rank's part of the sequence
            tp.sequence_parallel_parameters(self.norm, group)

    def forward(self, ids, targets):
        h = self.embed(ids)
        h = self.norm(h + self.down(torch.nn.functional.gelu(self.up(h))))
        logits = self.head(h)
        if self.group is None:
            return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
        return tp.vocab_parallel_cross_entropy(logits, targets, self.group).mean()


def batch(step, rows):
    g = torch.Generator().manual_seed(500 + step)
    ids = torch.randint(0, VOCAB, (rows, SEQ), generator=g)
    return ids, torch.roll(ids, -1, dims=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tensor", type=int, required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--zero", type=int, default=0)
    ap.add_argument("--clip", type=float, default=0.0)
    ap.add_argument("--save_at", type=int, nargs="*", default=[],
                    help="save a checkpoint after each of these many steps; stop after the last")
    ap.add_argument("--kill", default="", help="RANK:POINT: that rank dies at that point of the last save")
    ap.add_argument("--save_dir", default="")
    ap.add_argument("--load", default="", help="resume from this checkpoint directory (its latest tag)")
    ap.add_argument("--timeout", type=float, default=60)
    ap.add_argument("--sequence_parallel", action="store_true",
                    help="the norm and residual between the MLP and the head on each rank's part of the sequence")
    ap.add_argument("--plain", action="store_true", help="train the torch layers (no tensor group) on every rank")
    args = ap.parse_args()
    world = zeal.world()
    tp_group, dp_group, topology = tp.make_groups(args.tensor, world)
    torch.manual_seed(7)
    model = Model(None if args.plain else tp_group, args.sequence_parallel)
    torch.manual_seed(7)
    ref = Model()
    config = {"train_micro_batch_size_per_gpu": args.micro, "steps_per_print": 1000, "comms_timeout_s": args.timeout,
              "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": WD}},
              "zero_optimization": {"stage": args.zero, "reduce_bucket_size": 300}, "gradient_clipping": args.clip}
    engine, *_ = zeal.initialize(model=model, config=config, data_parallel_group=dp_group)
    opt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=WD)
    dp = dp_group.size
    start = 0
    if args.load:
        _, client = engine.load_checkpoint(args.load)
        start = engine.global_steps
        assert client == {"next_step": start}, client
    for step in range(args.steps):
        ids, targets = batch(step, args.micro * dp)
        if step < start:  # the reference catches up with the checkpoint
            opt.zero_grad()
            ref(ids, targets).backward()
            if args.clip:
                torch.nn.utils.clip_grad_norm_(ref.parameters(), args.clip)
            opt.step()
            continue
        rows = slice(dp_group.rank * args.micro, (dp_group.rank + 1) * args.micro)
        loss = engine(ids[rows], targets[rows])
        engine.backward(loss)
        engine.step()
        want = ref(ids, targets)
        opt.zero_grad()
        want.backward()
        if args.clip:
            norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), args.clip)
            assert abs(engine._core.last_grad_norm - norm.item()) <= 1e-5 * norm.item(), (engine._core.last_grad_norm,
                                                                                          norm.item())
        opt.step()
        mean = loss.detach().double().reshape(1)
        dp_group.all_reduce(mean, "sum").wait()
        got = mean.item() / dp
        assert abs(got - want.item()) <= 1e-5 * abs(want.item()), (step, got, want.item())
        if engine.global_steps in args.save_at:
            last = engine.global_steps == max(args.save_at)
            if last and args.kill:
                who, point = args.kill.split(":")
                if int(who) == world.rank:
                    engine._core.set_checkpoint_fault_hook(
                        lambda where: where == point and os.kill(os.getpid(), signal.SIGKILL))
            engine.save_checkpoint(args.save_dir, client_state={"next_step": engine.global_steps})
            print(f"SAVED step {engine.global_steps}", flush=True)
            if last:
                return
    for (name, p), (_, r) in zip(model.named_parameters(), ref.named_parameters()):
        if getattr(p, "tensor_parallel", False):
            size = p.shape[p.partition_dim]
            r = r.narrow(p.partition_dim, tp_group.rank * size, size)
        rel = ((p.detach() - r.detach()).abs().max() / r.detach().abs().max()).item()
        assert rel <= 1e-5, (name, rel)
    print(f"TP-OK rank {world.rank} tensor {tp_group.rank}/{tp_group.size} data {dp_group.rank}/{dp}", flush=True)


if __name__ == "__main__":
    main()
