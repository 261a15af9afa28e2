"""The user's own torch optimizer and LR scheduler (initialize(optimizer=..., lr_scheduler=...)) at
every ZeRO stage, against a single-process torch run of the same optimizer and LambdaLR on the
whole global batch. One process group runs every case (stage x optimizer), to share rank start-up.

Also checked here, because they need the same engines: the ZeRO debugging API (zeal.utils
safe_get_full_grad / _fp32_param / _optimizer_state, collective at stages >= 1) against the
reference, the optimizer's param_groups as schedulers see them, and a checkpoint of a client
optimizer's state resumed to the same parameters.
"""
import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
import zeal  # noqa: E402
from zeal.utils import safe_get_full_fp32_param, safe_get_full_grad, safe_get_full_optimizer_state  # noqa: E402

MICRO, GAS, STEPS = 2, 2, 6


def check(ok, message):
    if not ok:
        raise AssertionError(message)


def make_optimizer(kind, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.01)
    if kind == "adagrad":
        return torch.optim.Adagrad(params, lr=0.05, lr_decay=0.01, weight_decay=0.01)
    return torch.optim.AdamW(params, lr=0.01, weight_decay=0.05)


def schedule(step):
    return 1.0 / (1.0 + 0.5 * step)


def reference(kind, world):
    """Plain torch on one process: the whole global batch per step. Returns the parameters after
    STEPS steps, the learning rate then, the gradients of the first step and the optimizer state
    after the first step."""
    model = common.make_model()
    opt = make_optimizer(kind, model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    batch = MICRO * GAS * world
    first_grads, first_state = None, None
    for step in range(STEPS):
        x, y = common.global_batch(step, batch)
        opt.zero_grad()
        common.loss_fn(model(x), y).backward()
        if step == 0:
            first_grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        sched.step()
        if step == 0:
            key = {"sgd": "momentum_buffer", "adagrad": "sum", "adamw": "exp_avg"}[kind]
            first_state = [opt.state[p][key].clone() for p in model.parameters()]
    return [p.detach().clone() for p in model.parameters()], opt.param_groups[0]["lr"], first_grads, first_state


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def train(engine, world, rank, steps, start=0, on_first=None):
    for step in range(start, start + steps):
        x, y = common.global_batch(step, MICRO * GAS * world)
        for k in range(GAS):
            rows = common.micro_slice(step, k, rank, world, MICRO)
            engine.backward(common.loss_fn(engine(x[rows]), y[rows]))
            if step == 0 and k == GAS - 1 and on_first is not None:
                on_first()  # between the boundary backward and the step
            engine.step()


def run_case(kind, stage, world, rank, ref):
    ref_params, ref_lr, ref_grads, ref_state = ref
    model = common.make_model()
    opt = make_optimizer(kind, model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    config = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": GAS,
              "zero_optimization": {"stage": stage, "reduce_bucket_size": 500},
              "zero_allow_untested_optimizer": True, "steps_per_print": 1000}
    engine, zopt, _, zsched = zeal.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=config)
    what = f"{kind} stage {stage} on {world} ranks"
    check(zsched is sched, f"{what}: initialize did not return the user's scheduler")
    check(zopt.optimizer is opt and isinstance(zopt, torch.optim.Optimizer), f"{what}: optimizer wrapper")
    check("initial_lr" in zopt.param_groups[0], f"{what}: the scheduler's initial_lr is not in param_groups")
    params = list(model.parameters())
    key = {"sgd": "momentum_buffer", "adagrad": "sum", "adamw": "exp_avg"}[kind]

    def grads_at_boundary():
        for i, p in enumerate(params):
            g = safe_get_full_grad(p).float()
            check(rel(g, ref_grads[i]) < 1e-5, f"{what}: safe_get_full_grad of parameter {i} is off by "
                  f"{rel(g, ref_grads[i]):.2e}")

    train(engine, world, rank, 1, on_first=grads_at_boundary)
    for i, p in enumerate(params):
        state = safe_get_full_optimizer_state(p, key)
        check(rel(state, ref_state[i]) < 1e-5, f"{what}: optimizer state {key} of parameter {i} is off by "
              f"{rel(state, ref_state[i]):.2e}")
    train(engine, world, rank, STEPS - 1, start=1)
    worst = max(rel(safe_get_full_fp32_param(p), want) for p, want in zip(params, ref_params))
    check(worst < 1e-5, f"{what}: parameters differ from torch by {worst:.2e} (relative)")
    check(abs(engine.get_lr()[0] - ref_lr) < 1e-12, f"{what}: lr {engine.get_lr()[0]} != torch's {ref_lr}")
    check(engine.was_step_applied(), f"{what}: was_step_applied() is False after a boundary step")
    return worst


def resume_case(world, rank, stage):
    """A checkpoint of the user's AdamW state and LambdaLR position: 3 steps, save, 3 more; a new
    engine loads and runs the same 3: both end alike (the moments, the step count and the learning
    rate all came back)."""
    def build():
        model = common.make_model()
        opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.05)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        config = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": GAS,
                  "zero_optimization": {"stage": stage}, "steps_per_print": 1000}
        engine, *_ = zeal.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=config)
        return engine, model

    tmp = tempfile.mkdtemp(prefix="zeal-client-") if rank == 0 else ""
    name = torch.zeros(256, dtype=torch.uint8)
    if rank == 0:
        name[:len(tmp)] = torch.tensor(list(tmp.encode()), dtype=torch.uint8)
    zeal.world().broadcast(name, 0).wait()
    tmp = bytes(name[name != 0].tolist()).decode()
    engine, model = build()
    train(engine, world, rank, 3)
    engine.save_checkpoint(tmp, tag="t")
    train(engine, world, rank, 3, start=3)
    want = [safe_get_full_fp32_param(p) for p in model.parameters()]
    engine2, model2 = build()
    engine2.load_checkpoint(tmp, tag="t")
    check(engine2.global_steps == 3, f"resumed engine at step {engine2.global_steps}, expected 3")
    check(abs(engine2.get_lr()[0] - 0.01 * schedule(3)) < 1e-12, f"resumed lr {engine2.get_lr()[0]}")
    train(engine2, world, rank, 3, start=3)
    got = [safe_get_full_fp32_param(p) for p in model2.parameters()]
    worst = max(rel(g, w) for g, w in zip(got, want))
    check(worst < 1e-6, f"client AdamW resumed from a checkpoint (stage {stage}) differs by {worst:.2e}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stages", default="0,1,2,3")
    ap.add_argument("--kinds", default="sgd,adamw,adagrad")
    args = ap.parse_args()
    world, rank = zeal.world().size, zeal.world().rank
    for kind in args.kinds.split(","):
        ref = reference(kind, world)
        for stage in map(int, args.stages.split(",")):
            worst = run_case(kind, stage, world, rank, ref)
            if rank == 0:
                print(f"client {kind} stage {stage} world {world}: max rel diff {worst:.2e}", flush=True)
    resume_case(world, rank, stage=2)
    if rank == 0:
        print("client optimizer checkpoint resume: ok", flush=True)


if __name__ == "__main__":
    main()
