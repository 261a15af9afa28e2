"""Train the equivalence model through Zeal with checkpoints: optionally load first, train up to
--until, save at --save_at steps. Rank 0 writes the final full parameters to --out. The global
batch stays --batch whatever the world size, so runs at different sizes see the same data.
--kill RANK:POINT makes that rank SIGKILL itself at a checkpoint fault point on the last save."""
import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
import zeal  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--until", type=int, default=10)
    ap.add_argument("--save_at", type=int, nargs="*", default=[])
    ap.add_argument("--save_dir", default="")
    ap.add_argument("--load", default="")
    ap.add_argument("--kill", default="")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--offload", default="none", choices=["none", "cpu", "nvme"],
                    help="zero_optimization.offload_optimizer device")
    ap.add_argument("--nvme_path", default="", help="offload_optimizer.nvme_path for --offload nvme")
    ap.add_argument("--onebit_freeze", type=int, default=0, help="OneBitAdam with this freeze_step instead of AdamW")
    ap.add_argument("--compressed", default="OneBitAdam", choices=["OneBitAdam", "ZeroOneAdam", "OneBitLamb"],
                    help="with --onebit_freeze: the compressed optimizer (its freeze_step or var_freeze_step)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    world = zeal.world().size
    config = {
        "train_batch_size": args.batch, "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 5, "warmup_max_lr": 1e-2}},
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": args.stage, "reduce_bucket_size": 100, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 1000, "comms_timeout_s": 60,
    }
    if args.precision == "bf16":
        config["bf16"] = {"enabled": True}
    if args.onebit_freeze:
        params = {"lr": 1e-2, "weight_decay": 0.01, "freeze_step": args.onebit_freeze}
        if args.compressed == "ZeroOneAdam":
            params = {"lr": 1e-2, "weight_decay": 0.01, "var_freeze_step": args.onebit_freeze,
                      "var_update_scaler": 2, "local_step_scaler": 2, "local_step_clipper": 4}
        config["optimizer"] = {"type": args.compressed, "params": params}
        config["comms_logger"] = {"enabled": True}
    if args.offload != "none":
        config["zero_optimization"]["offload_optimizer"] = {"device": args.offload, "nvme_path": args.nvme_path}
        config["zero_optimization"]["sub_group_size"] = 700  # several swap files per rank
    model = common.make_model()
    engine, _, _, _ = zeal.initialize(model=model, config=config)
    rank = engine.global_rank
    micro = args.batch // world
    client = {}
    if args.load:
        path, client = engine.load_checkpoint(args.load)
        assert path is not None and client["next_step"] == engine.global_steps, (path, client, engine.global_steps)
    if args.kill:
        who, point = args.kill.split(":")
        last_save = max(args.save_at)

        def hook(where):
            if int(who) == rank and where == point and engine.global_steps == last_save:
                os.kill(os.getpid(), signal.SIGKILL)
        engine._core.set_checkpoint_fault_hook(hook)
    for step in range(engine.global_steps, args.until):
        x, y = common.global_batch(step, args.batch)
        rows = slice(rank * micro, (rank + 1) * micro)
        dtype = next(model.parameters()).dtype
        engine.backward(common.loss_fn(engine(x[rows].to(dtype)), y[rows]))
        engine.step()
        if engine.global_steps in args.save_at:
            engine.save_checkpoint(args.save_dir, client_state={"next_step": engine.global_steps, "note": "ok"})
    with zeal.zero.GatheredParameters(list(model.parameters())):
        if rank == 0:
            names = [n for n, _ in model.named_parameters()]
            torch.save({"params": {n: p.detach().float().clone() for n, p in zip(names, model.parameters())},
                        "lr": engine.get_lr(), "steps": engine.global_steps, "client": json.dumps(client),
                        "comms": engine.comms_log_summary(show=False),
                        "skipped_rounds": engine.skipped_comm_rounds}, args.out)


if __name__ == "__main__":
    main()
