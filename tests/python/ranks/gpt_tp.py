"""The demo GPT (examples/python/gpt.py) against its tensor-parallel variant: the full model in one
torch process and TensorParallelGPT over a tensor group (x data), built from the same full model,
trained 6 steps with AdamW; every step's loss must agree (fp32: 1e-5 relative)."""
import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "examples" / "python"))
import gpt  # noqa: E402
import zeal  # noqa: E402
from zeal import tensor_parallel as tp  # noqa: E402

VOCAB, BLOCK, LR = 32, 16, 3e-3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tensor", type=int, required=True)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--clip", type=float, default=0.0)
    ap.add_argument("--sequence_parallel", action="store_true")
    args = ap.parse_args()
    world = zeal.world()
    tp_group, dp_group, _ = tp.make_groups(args.tensor, world)
    torch.manual_seed(3)
    full = gpt.GPT(VOCAB, block=BLOCK, width=32, layers=2, heads=4)
    ref = copy.deepcopy(full)
    model = gpt.TensorParallelGPT(full, tp_group, sequence_parallel=args.sequence_parallel)
    config = {"train_micro_batch_size_per_gpu": 2, "steps_per_print": 1000, "comms_timeout_s": 60,
              "gradient_clipping": args.clip, "optimizer": {"type": "AdamW", "params": {"lr": LR}}}
    engine, *_ = zeal.initialize(model=model, config=config, data_parallel_group=dp_group)
    opt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=0.0)
    dp = dp_group.size
    for step in range(args.steps):
        g = torch.Generator().manual_seed(step)
        idx = torch.randint(0, VOCAB, (2 * dp, BLOCK + 1), generator=g)
        x, y = idx[:, :-1], idx[:, 1:]
        rows = slice(2 * dp_group.rank, 2 * dp_group.rank + 2)
        loss = engine(x[rows], y[rows])
        engine.backward(loss)
        engine.step()
        want = ref(x, y)
        opt.zero_grad()
        want.backward()
        if args.clip:
            torch.nn.utils.clip_grad_norm_(ref.parameters(), args.clip)
        opt.step()
        got = loss.detach().double().reshape(1)
        dp_group.all_reduce(got, "sum").wait()
        assert abs(got.item() / dp - want.item()) <= 1e-5 * want.item(), (step, got.item() / dp, want.item())
    print(f"GPT-TP-OK rank {world.rank}", flush=True)


if __name__ == "__main__":
    main()
