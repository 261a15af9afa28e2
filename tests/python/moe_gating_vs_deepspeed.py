"""zeal.moe's gating and MoE layer against DeepSpeed's own (deepspeed.moe), one process, seeded
alike: every gating variant gives the same tensors bit for bit, and a state dict moved from a
DeepSpeed MoE layer into a Zeal one gives the same output. Run by test_moe.py when DeepSpeed is
installed; prints GATING-OK."""
import torch

import zeal.moe.layer
import zeal.moe.sharded_moe as zm
from deepspeed.moe import layer as ds_layer
from deepspeed.moe import sharded_moe as ds


def check(cond, message):
    if not cond:
        raise AssertionError(message)


def same(a, b, what):
    check(len(a) == len(b), f"{what}: {len(a)} outputs against DeepSpeed's {len(b)}")
    for i, (x, y) in enumerate(zip(a, b)):
        if torch.is_tensor(x) or torch.is_tensor(y):
            x, y = torch.as_tensor(x), torch.as_tensor(y)
            check(x.shape == y.shape and torch.equal(x, y), f"{what}: output {i} differs:\n{x}\n{y}")
        else:
            check(x == y, f"{what}: output {i}: {x} != {y}")


def main():
    logits = torch.randn(32, 4, generator=torch.Generator().manual_seed(3)) * 2
    used = (torch.rand(32, generator=torch.Generator().manual_seed(4)) > 0.3).long()
    cases = []
    for sparse in (False, True):
        for kw in (dict(), dict(use_rts=False), dict(noisy_gate_policy="RSample"), dict(drop_tokens=False),
                   dict(used_token=used), dict(capacity_factor=2.0, min_capacity=20)):
            args = dict(capacity_factor=0.5, min_capacity=1, sparse_routes=sparse)
            args.update(kw)
            cases.append((f"top1 {kw} sparse={sparse}", ds.top1gating, zm.top1gating, args))
        for kw in (dict(), dict(top2_2nd_expert_sampling=False), dict(drop_tokens=False)):
            args = dict(capacity_factor=0.5, min_capacity=1, sparse_routes=sparse)
            args.update(kw)
            cases.append((f"top2 {kw} sparse={sparse}", ds.top2gating, zm.top2gating, args))
        for kw in (dict(drop_policy="probs"), dict(drop_policy="position"), dict(drop_tokens=False)):
            args = dict(k=3, capacity_factor=0.5, min_capacity=1, sparse_routes=sparse)
            args.update(kw)
            cases.append((f"topk {kw} sparse={sparse}", ds.topkgating, zm.topkgating, args))
    for what, theirs, ours, args in cases:
        torch.manual_seed(1)
        want = theirs(logits.clone(), **args)
        torch.manual_seed(1)
        got = ours(logits.clone(), **args)
        same(got, want, what)

    # A whole layer: DeepSpeed's MoE state dict loads into Zeal's (same names) and gives the same
    # output, l_aux and counts, in training mode (Jitter noise, RTS) and in eval mode.
    for k, extra in ((1, dict(noisy_gate_policy="Jitter")), (2, dict()), (3, dict()), (1, dict(use_residual=True))):
        torch.manual_seed(0)
        expert = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
        theirs = ds_layer.MoE(8, expert, num_experts=4, ep_size=1, k=k, capacity_factor=0.75, min_capacity=2, **extra)
        ours = zeal.moe.layer.MoE(8, expert, num_experts=4, ep_size=1, k=k, capacity_factor=0.75, min_capacity=2,
                                  **extra)
        state = theirs.state_dict()
        for name in state:
            state[name] = torch.randn(state[name].shape, generator=torch.Generator().manual_seed(len(name)))
        theirs.load_state_dict(state)
        ours.load_state_dict(state)
        x = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(9))
        for mode in ("train", "eval"):
            theirs.train(mode == "train")
            ours.train(mode == "train")
            torch.manual_seed(5)
            want = theirs(x)
            torch.manual_seed(5)
            got = ours(x)
            check(torch.allclose(got[0], want[0], rtol=1e-6, atol=1e-6),
                  f"MoE k={k} {extra} {mode}: outputs differ by {(got[0] - want[0]).abs().max().item()}")
            same(got[1:], want[1:], f"MoE k={k} {extra} {mode} l_aux, exp_counts")
    print("GATING-OK", flush=True)


if __name__ == "__main__":
    main()
