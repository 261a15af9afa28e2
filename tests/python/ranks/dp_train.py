"""One rank of a data-parallel run through zeal.initialize; rank 0 saves the final parameters
(and the master copy under bf16/fp16) to OUT."""
import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
import zeal  # noqa: E402


def engine_local_rank():
    for name in ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK"):
        if name in os.environ:
            return int(os.environ[name])
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--gas", type=int, default=1)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--weight_decay", type=float, default=0.01)
    ap.add_argument("--clip", type=float, default=0.0)
    ap.add_argument("--bucket", type=int, default=500)
    ap.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd", "lamb", "adagrad", "onebitadam", "adamw_nobc",
                                                            "zerooneadam", "onebitlamb", "lamb_nobc"])
    ap.add_argument("--predivide", type=float, default=0.0, help="prescale_gradients with this factor")
    ap.add_argument("--comm_dtype", default="")
    ap.add_argument("--stage", type=int, default=0)
    ap.add_argument("--persist", type=int, default=0, help="stage3_param_persistence_threshold")
    ap.add_argument("--prefetch", type=int, default=1000, help="stage3_prefetch_bucket_size")
    ap.add_argument("--max_live", type=int, default=10**9, help="stage3_max_live_parameters")
    ap.add_argument("--offload", nargs="?", const="cpu", default=None, choices=["cpu", "nvme"],
                    help="zero_optimization.offload_optimizer device")
    ap.add_argument("--nvme_path", default=None, help="offload_optimizer.nvme_path and offload_param.nvme_path")
    ap.add_argument("--offload_param", default=None, choices=["cpu", "nvme"], help="zero_optimization.offload_param")
    ap.add_argument("--sub_group", type=int, default=None, help="zero_optimization.sub_group_size")
    ap.add_argument("--pipeline", action="store_true", help="offload_optimizer pipeline_read and pipeline_write")
    ap.add_argument("--aio_threads", type=int, default=None, help="aio.thread_count")
    ap.add_argument("--zero_init", action="store_true", help="build the model under zeal.zero.Init")
    ap.add_argument("--out", required=True)
    ap.add_argument("--local_rank", type=int, default=-1, help="passed by the zeal launcher")
    ap.add_argument("--freeze_step", type=int, default=10, help="OneBitAdam's and OneBitLamb's freeze_step")
    ap.add_argument("--var_freeze_step", type=int, default=10, help="ZeroOneAdam's var_freeze_step")
    ap.add_argument("--var_update_scaler", type=int, default=4, help="ZeroOneAdam's var_update_scaler")
    ap.add_argument("--local_step_scaler", type=int, default=8, help="ZeroOneAdam's local_step_scaler")
    ap.add_argument("--local_step_clipper", type=int, default=4, help="ZeroOneAdam's local_step_clipper")
    ap.add_argument("--teacher", action="store_true", help="learnable targets (common.teacher_batch)")
    ap.add_argument("--device", default="cpu", help="where the model and batches live (cuda: one GPU per rank)")
    ap.add_argument("--freeze_first", action="store_true", help="freeze the first layer (stage 3 partitions it too)")
    ap.add_argument("--quantized_frozen", action="store_true", help="zero_quantized_nontrainable_weights")
    args = ap.parse_args()

    config = {
        "train_micro_batch_size_per_gpu": args.micro,
        "gradient_accumulation_steps": args.gas,
        "optimizer": {
            "adamw": {"type": "AdamW", "params": {"lr": args.lr, "weight_decay": args.weight_decay}},
            "sgd": {"type": "SGD", "params": {"lr": args.lr, "momentum": 0.9, "weight_decay": args.weight_decay}},
            "lamb": {"type": "Lamb", "params": {"lr": args.lr, "weight_decay": args.weight_decay}},
            "adagrad": {"type": "Adagrad", "params": {"lr": args.lr, "weight_decay": args.weight_decay,
                                                      "lr_decay": 0.01, "initial_accumulator_value": 0.1}},
            # 1-bit Adam and its uncompressed twin (DeepSpeed's 1-bit Adam has no bias correction)
            "onebitadam": {"type": "OneBitAdam", "params": {"lr": args.lr, "weight_decay": args.weight_decay,
                                                            "freeze_step": args.freeze_step}},
            "adamw_nobc": {"type": "AdamW", "params": {"lr": args.lr, "weight_decay": args.weight_decay,
                                                       "bias_correction": False}},
            "zerooneadam": {"type": "ZeroOneAdam", "params": {
                "lr": args.lr, "weight_decay": args.weight_decay, "var_freeze_step": args.var_freeze_step,
                "var_update_scaler": args.var_update_scaler, "local_step_scaler": args.local_step_scaler,
                "local_step_clipper": args.local_step_clipper}},
            # 1-bit LAMB and its uncompressed twin (no bias correction either)
            "onebitlamb": {"type": "OneBitLamb", "params": {"lr": args.lr, "weight_decay": args.weight_decay,
                                                            "freeze_step": args.freeze_step}},
            "lamb_nobc": {"type": "Lamb", "params": {"lr": args.lr, "weight_decay": args.weight_decay,
                                                     "bias_correction": False}},
        }[args.optimizer],
        "gradient_clipping": args.clip,
        "zero_optimization": {"stage": args.stage, "reduce_bucket_size": args.bucket,
                              "stage3_param_persistence_threshold": args.persist,
                              "stage3_prefetch_bucket_size": args.prefetch,
                              "stage3_max_live_parameters": args.max_live},
        "steps_per_print": 1000,
        "comms_timeout_s": 60,
    }
    if args.offload == "cpu":
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    elif args.offload == "nvme":
        config["zero_optimization"]["offload_optimizer"] = {
            "device": "nvme", "nvme_path": args.nvme_path, "pipeline_read": args.pipeline,
            "pipeline_write": args.pipeline}
    if args.offload_param:
        config["zero_optimization"]["offload_param"] = {"device": args.offload_param, "nvme_path": args.nvme_path}
    if args.sub_group:
        config["zero_optimization"]["sub_group_size"] = args.sub_group
    if args.aio_threads:
        config["aio"] = {"thread_count": args.aio_threads, "queue_depth": 4, "block_size": 8192}
    if args.predivide:
        config["prescale_gradients"] = True
        config["gradient_predivide_factor"] = args.predivide
    if args.comm_dtype:
        config["communication_data_type"] = args.comm_dtype
    if args.quantized_frozen:
        config["zero_optimization"]["zero_quantized_nontrainable_weights"] = True
    if args.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif args.precision == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 12}
    if args.zero_init:
        with zeal.zero.Init(config_dict_or_path=config):
            model = common.make_model()
        assert all(p.numel() == 0 for p in model.parameters()), "zero.Init left a parameter whole"
    else:
        model = common.make_model()
    if args.freeze_first:
        model[0].requires_grad_(False)
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", engine_local_rank() % torch.cuda.device_count())
        torch.cuda.set_device(device)
        model.to(device)
    engine, _, _, _ = zeal.initialize(model=model, config=config)
    rank, world = engine.global_rank, engine.world_size
    assert engine.train_batch_size() == args.micro * args.gas * world
    losses = []  # this rank's mean micro-batch loss per step
    for step in range(args.steps):
        x, y = (common.teacher_batch if args.teacher else common.global_batch)(step, engine.train_batch_size())
        for k in range(args.gas):
            rows = common.micro_slice(step, k, rank, world, args.micro)
            dtype = next(model.parameters()).dtype
            loss = common.loss_fn(engine(x[rows].to(device, dtype)), y[rows].to(device))
            if k == 0:
                losses.append(0.0)
            losses[-1] += loss.item() / args.gas
            engine.backward(loss)
            assert engine.is_gradient_accumulation_boundary() == (k == args.gas - 1)
            skipped_before = engine.skipped_comm_rounds
            engine.step()
    assert engine.global_steps == args.steps, engine.global_steps
    peak_live = engine._core.peak_live_elements if args.stage == 3 else 0  # before gathering all below
    if args.stage == 3:
        partitioned = [p for p in model.parameters() if p.numel() == 0]
        assert len(partitioned) == sum(p.ds_numel > args.persist for p in model.parameters()), "release missed"
        gathered = zeal.zero.GatheredParameters(list(model.parameters()))
        gathered.__enter__()
    # Every replica must hold the same weights: compare against rank 0's with a max/min reduce.
    flat = torch.cat([p.detach().float().reshape(-1) for p in model.parameters()]).cpu()  # (the MPI world takes host tensors)
    hi, lo = flat.clone(), flat.clone()
    comm = zeal.world()
    comm.all_reduce(hi, "max").wait()
    comm.all_reduce(lo, "min").wait()
    # 0/1 Adam's replicas differ between synchronisations, by design; after one they are equal.
    synced = engine.skipped_comm_rounds == skipped_before
    assert torch.equal(hi, lo) or not synced, "replicas diverged"
    if rank == 0:
        core = engine._core
        torch.save({"params": [p.detach().float().cpu() for p in model.parameters()],
                    "buckets": core.num_buckets, "flat_numel": core.flat_numel, "master_numel": core.master_numel,
                    "grad_shard_numel": core.grad_shard_numel, "world": world,
                    "peak_live": peak_live, "master_device": core.master_device, "losses": losses,
                    "param_device": str(next(model.parameters()).device)}, args.out)


if __name__ == "__main__":
    main()
