"""One rank of a 2-, 3- or 4-rank job: ZeRO-3 partitions frozen parameters (requires_grad false)
and ZeRO++ stores them quantized (zero_quantized_nontrainable_weights), each equal to a plain-torch
process, fp32 to 1e-5: every step's loss, the first step's gradients and the final weights.

The model is zeropp.py's (parameters of 1, 7, 8, 9, 72 and 4099 elements) with the 4099-element
table, lin1 (72 and 8) and shift7 (7) frozen, handed to initialize the way a LoRA script does (only
the trainable parameters in model_parameters) or whole. Checked, at every rank count:
  - exact: frozen parameters partitioned (this rank holds ceil(numel / N) of each, measured through
    state_bytes), released between uses, unchanged by training, and the run equals torch;
  - quantized: the frozen chunks are stored as 8-bit blocks (state_bytes shows the wire size, about
    a quarter of fp32's) and the run equals torch computing with the frozen weights quantized once,
    per rank chunk (zeropp.py's qwz); a control checks that reference differs from the exact one;
    with qwZ and with hpZ (--hpz) too;
  - checkpoints: the frozen values (dequantized) load into an engine without quantization and back;
    the 16-bit state dict holds them whole; a GatheredParameters modifier on a frozen parameter
    lasts; a model built under zeal.zero.Init and then frozen trains as the exact reference;
  - DeepSpeed's optimizer.quantize_nontrainable_params() has nothing to do, and refuses a parameter
    frozen after initialize, naming it.
Prints FROZEN-OK."""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import check, close  # noqa: E402
from zeropp import Odd, batch, qwz, B, LR  # noqa: E402
import zeal  # noqa: E402

STEPS = 4
FROZEN = ("table", "lin1.weight", "lin1.bias", "shift7")


def freeze(model):
    for n, p in model.named_parameters():
        p.requires_grad_(n not in FROZEN)
    return model


def reference(world, frozen_quantized, qwz_trainable=False):
    """Torch on the whole batch; frozen weights (quantized once per rank chunk) never move; with
    qwz_trainable the trainable ones are seen through qwZ at every step."""
    model = freeze(Odd())
    with torch.no_grad():
        if frozen_quantized:
            for n, p in model.named_parameters():
                if n in FROZEN:
                    p.copy_(qwz(p, world))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=LR, weight_decay=0.0)
    losses = []
    for step in range(STEPS):
        exact = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        if qwz_trainable:
            with torch.no_grad():
                for p in trainable:
                    p.copy_(qwz(p, world))
        opt.zero_grad()
        loss = sum(model(*[t[r::world] for t in batch(step)]) for r in range(world)) / world
        loss.backward()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in exact:
                    p.copy_(exact[n])
        if step == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        opt.step()
        losses.append(loss.item())
    return losses, grads, {n: p.detach().clone() for n, p in model.named_parameters()}


def config(world, quantized, qwz_on=False, hpz=1):
    return {"train_micro_batch_size_per_gpu": B // world, "gradient_accumulation_steps": 1, "steps_per_print": 1000,
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.0}},
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                  "stage3_max_reuse_distance": 0, "zero_quantized_nontrainable_weights": quantized,
                                  "zero_quantized_weights": qwz_on, "zero_hpz_partition_size": hpz,
                                  "stage3_gather_16bit_weights_on_model_save": True},
            "comms_timeout_s": 60}


def engine_of(world, quantized, qwz_on=False, hpz=1, lora_style=True, model=None):
    model = freeze(Odd()) if model is None else model
    params = [p for p in model.parameters() if p.requires_grad] if lora_style else None
    engine, *_ = zeal.initialize(model=model, model_parameters=params, config=config(world, quantized, qwz_on, hpz))
    return engine


def frozen_values(engine):
    return {n: engine._frozen_value(p) for n, p in engine.module.named_parameters() if n in FROZEN}


def train(engine, world, rank):
    losses = []
    for step in range(STEPS):
        loss = engine(*[t[rank::world] for t in batch(step)])
        engine.backward(loss)
        if step == 0:
            grads = {n: zeal.utils.safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()
                     if n not in FROZEN}
        engine.step()
        total = torch.tensor([loss.item()])
        zeal.world().all_reduce(total, "sum").wait()
        losses.append(total.item() / world)
    final = {n: zeal.utils.safe_get_full_fp32_param(p).clone() for n, p in engine.module.named_parameters()
             if n not in FROZEN}
    final.update(frozen_values(engine))
    return losses, grads, final


def compare(got, want, what):
    for step, (a, b) in enumerate(zip(got[0], want[0])):
        close(torch.tensor(a), torch.tensor(b), f"{what}: loss of step {step}")
    for n in want[1]:
        close(got[1][n].reshape(-1), want[1][n].reshape(-1), f"{what}: first gradient of {n}")
    for n in want[2]:
        close(got[2][n].reshape(-1), want[2][n].reshape(-1), f"{what}: final {n}")


def frozen_bytes(world, quantized, hpz=1):
    """What this rank's frozen chunks take: fp32, or 8-bit blocks with their scales; with hpZ, also
    the copy of the world / hpz chunks of its column, in the same form."""
    sizes = [-(-p.numel() // world) for n, p in Odd().named_parameters() if n in FROZEN]
    copies = 1 + (world // hpz if hpz > 1 else 0)
    if quantized:
        return copies * sum(zeal._zeal.quantized_wire_bytes(c, 8, 2048) for c in sizes)
    return copies * sum(4 * c for c in sizes)


def check_partitioned(engine, world, quantized, hpz=1):
    core = engine._core
    names = sorted(core.frozen_parameter_names)
    check(names == sorted(FROZEN), f"frozen parameters partitioned: {names}")
    for n, p in engine.module.named_parameters():
        if n in FROZEN:
            check(p.numel() == 0 and tuple(p.ds_shape) == tuple(dict(Odd().named_parameters())[n].shape),
                  f"frozen {n} should be released between uses (numel {p.numel()}, ds_shape {p.ds_shape})")
    # nothing is live after a step with threshold 0: the trainable shard (fp32) and the frozen chunks
    # with hpZ, its copy of the trainable shards too: world / hpz of them, fp32
    want = 4 * core.master_numel * (1 + (world // hpz if hpz > 1 else 0)) + frozen_bytes(world, quantized, hpz)
    got = core.state_bytes["params"]
    check(got == want, f"parameter bytes on this rank {got}, want {want} (frozen chunks "
          f"{'quantized' if quantized else 'fp32'}, hpZ {hpz}: {frozen_bytes(world, quantized, hpz)})")


def check_checkpoints(world, rank, where, hpz):
    """Quantized frozen values survive a checkpoint into an engine without quantization (as the
    values they stand for) and back (quantized again: the same values to 1e-6); the 16-bit state
    dict holds them whole; a GatheredParameters modifier on a frozen parameter lasts."""
    want = reference(world, True)[2]
    q = engine_of(world, True, hpz=hpz)
    train(q, world, rank)
    q.save_checkpoint(where, tag="frozen")
    state = q._zero3_consolidated_16bit_state_dict()
    if rank == 0:
        for n in FROZEN:
            close(state[n].reshape(-1), want[n].reshape(-1), f"16-bit state dict: frozen {n}")
    plain = engine_of(world, False, lora_style=False)
    plain.load_checkpoint(where, tag="frozen")
    got = frozen_values(plain)
    for n in FROZEN:
        close(got[n].reshape(-1), want[n].reshape(-1), f"quantized checkpoint into plain ZeRO-3: frozen {n}", tol=0)
    again = engine_of(world, True)
    again.load_checkpoint(where, tag="frozen")
    got = frozen_values(again)
    for n in FROZEN:
        close(got[n].reshape(-1), want[n].reshape(-1), f"quantized checkpoint into quantized: frozen {n}", tol=1e-6)
    # A modifier's values replace the frozen chunks on every rank. On the quantized engine (with
    # hpZ its copy within the node must follow) they are stored quantized again: within half a
    # level, 1/254 of the largest.
    for engine, tol, what in ((plain, 1e-5, ""), (q, 1 / 254 + 1e-6, f"quantized (hpZ {hpz}) ")):
        table = dict(engine.module.named_parameters())["table"]
        with zeal.zero.GatheredParameters([table], modifier_rank=0):
            if rank == 0:
                with torch.no_grad():
                    table.copy_(torch.linspace(-1, 1, 4099).view_as(table))
        close(frozen_values(engine)["table"].reshape(-1), torch.linspace(-1, 1, 4099),
              f"GatheredParameters modifier on a {what}frozen table", tol=tol)


def check_zero_init(world, rank):
    """Built under zeal.zero.Init (every parameter partitioned as it is made), frozen afterwards."""
    with zeal.zero.Init(config_dict_or_path=config(world, False)):
        model = Odd()
    freeze(model)
    compare(train(engine_of(world, False, model=model), world, rank), reference(world, False),
            f"zero.Init-built, then frozen, at {world} ranks")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hpz", type=int, default=1, help="also run hpZ with this secondary partition size")
    ap.add_argument("--checkpoints", help="a directory every rank sees")
    args = ap.parse_args()
    world = zeal.world()
    n, rank = world.size, world.rank
    exact, quantized = reference(n, False), reference(n, True)
    differ = max((quantized[2][k] - exact[2][k]).abs().max().item() for k in exact[2])
    check(differ > 1e-4, f"the quantized-frozen reference should move away from the exact one (max {differ:.2e})")
    for lora_style in (True, False):
        e = engine_of(n, False, lora_style=lora_style)
        got = train(e, n, rank)
        check_partitioned(e, n, False)
        compare(got, exact, f"frozen partitioned (model_parameters {'trainable only' if lora_style else 'all'}) "
                f"at {n} ranks")
    e = engine_of(n, True)
    compare(train(e, n, rank), quantized, f"zero_quantized_nontrainable_weights at {n} ranks")
    check_partitioned(e, n, True)
    e.optimizer.quantize_nontrainable_params()  # DeepSpeed's LoRA recipe: frozen before initialize, nothing to do
    dict(e.module.named_parameters())["gain"].requires_grad_(False)  # frozen after: refused, named
    try:
        e.optimizer.quantize_nontrainable_params()
        refused = ""
    except zeal.ConfigError as err:
        refused = str(err)
    check("frozen after initialize" in refused and "gain" in refused, f"late freeze refused: {refused!r}")
    compare(train(engine_of(n, True, qwz_on=True), n, rank), reference(n, True, qwz_trainable=True),
            f"quantized frozen + qwZ at {n} ranks")
    if args.hpz > 1:
        for q, want in ((False, exact), (True, quantized)):
            e = engine_of(n, q, hpz=args.hpz)
            compare(train(e, n, rank), want, f"{'quantized ' if q else ''}frozen + hpZ {args.hpz} at {n} ranks")
            check_partitioned(e, n, q, args.hpz)
    if args.checkpoints:
        check_checkpoints(n, rank, args.checkpoints, args.hpz)
    check_zero_init(n, rank)
    print(f"FROZEN-OK rank {rank}", flush=True)


if __name__ == "__main__":
    main()
