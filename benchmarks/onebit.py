"""1-bit Adam and 0/1 Adam over a slow link: 2 ranks in two network namespaces joined by a veth pair
whose bandwidth `tc` limits (token bucket), the demo GPT (3.2M parameters), the mean step time of
Adam, of 1-bit Adam and of 0/1 Adam after their freeze step (0/1 Adam: local steps with intervals
1, 2, 4, synchronised by the compressed all-reduce, --local_step_scaler steps per interval).
DeepSpeed's 1-bit optimizers are reported where they can run: the PyPI DeepSpeed this project pins
no longer ships them (deepspeed.runtime.fp16.onebit is gone), and the releases that had them need
CUDA and cupy. Each rank is started on its own inside its namespace with
RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT (Zeal's rendezvous joins them) and Open MPI's TCP
transport pinned to the veth, so every byte between them crosses the limited link.

Needs root (ip netns, tc). The namespaces and links are removed at the end.

    python3 benchmarks/onebit.py --rates 1gbit 100mbit --steps 30 --out out/bench/onebit_link.json
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from harness import ROOT, LinkedNamespaces, print_table, write_json

LINK = LinkedNamespaces("zeal1b", "10.213.9")


RANK_SCRIPT = r"""
import json, os, statistics, sys, time
sys.path.insert(0, sys.argv[1])
import torch
import zeal
from gpt import GPT
optimizer, steps, freeze, scaler = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(1)
rank = int(os.environ["RANK"])
torch.manual_seed(0)
model = GPT(96, block=128)
params = {"lr": 1e-3, "weight_decay": 0.01}
opt = {"onebit": {"type": "OneBitAdam", "params": {**params, "freeze_step": freeze}},
       "zeroone": {"type": "ZeroOneAdam", "params": {**params, "var_freeze_step": freeze, "local_step_scaler": scaler,
                                                     "local_step_clipper": 4}},
       "adam": {"type": "AdamW", "params": {**params, "bias_correction": False}}}[optimizer]
config = {"train_micro_batch_size_per_gpu": 8, "steps_per_print": 10**9, "optimizer": opt,
          "zero_optimization": {"stage": 0, "reduce_bucket_size": 500000}, "comms_timeout_s": 300}
engine, *_ = zeal.initialize(model=model, config=config)
g = torch.Generator().manual_seed(rank)
x = torch.randint(0, 96, (8, 128), generator=g)
y = torch.randint(0, 96, (8, 128), generator=g)
times = []
for step in range(steps):
    zeal.world().barrier().wait()
    t0 = time.perf_counter()
    engine.backward(engine(x, y))
    engine.step()
    zeal.world().barrier().wait()
    times.append(time.perf_counter() - t0)
if rank == 0:
    print("TIMES " + json.dumps({"times": times, "skipped": engine.skipped_comm_rounds}), flush=True)
"""


def run(optimizer, steps, freeze, scaler, port):
    script = Path("/tmp/zeal_onebit_rank.py")
    script.write_text(RANK_SCRIPT)
    outs = LINK.run_ranks(script, [ROOT / "examples" / "python", optimizer, steps, freeze, scaler], 2, port, optimizer,
                          1200)
    line = next(l for l in outs[0].splitlines() if l.startswith("TIMES "))
    return json.loads(line[len("TIMES "):])


def deepspeed_onebit():
    """Whether DeepSpeed's 1-bit Adam can run here, in words for the table."""
    probe = "import deepspeed.runtime.fp16.onebit.adam"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    if proc.returncode != 0:
        version = subprocess.run([sys.executable, "-c", "import deepspeed; print(deepspeed.__version__)"],
                                 capture_output=True, text=True).stdout.strip().splitlines()
        return f"not run: deepspeed {version[-1] if version else '(not installed)'} has no 1-bit Adam"
    return "not run: needs CUDA and cupy"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", nargs="+", default=["1gbit", "100mbit"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--freeze_step", type=int, default=5)
    ap.add_argument("--local_step_scaler", type=int, default=4, help="0/1 Adam's local steps per interval")
    ap.add_argument("--out", default="out/bench/onebit_link.json")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("benchmarks/onebit.py needs root (ip netns, tc)")
    results, rows = [], []
    port = 29810
    deepspeed = deepspeed_onebit()
    try:
        for rate in args.rates:
            LINK.setup(rate)
            mean, skipped = {}, {}
            for optimizer in ("adam", "onebit", "zeroone"):
                port += 1
                print(f"onebit: {rate}, {optimizer}, {args.steps} steps ...", flush=True)
                record = run(optimizer, args.steps, args.freeze_step, args.local_step_scaler, port)
                after = record["times"][args.freeze_step + 2:]
                mean[optimizer] = statistics.mean(after)
                skipped[optimizer] = record["skipped"]
                results.append({"rate": rate, "optimizer": optimizer, "times_s": record["times"],
                                "mean_after_freeze_s": mean[optimizer], "median_after_freeze_s": statistics.median(after),
                                "skipped_rounds": record["skipped"]})
            rows.append([rate, f"{mean['adam'] * 1e3:.1f}", f"{mean['onebit'] * 1e3:.1f}",
                         f"{mean['adam'] / mean['onebit']:.2f}", f"{mean['zeroone'] * 1e3:.1f}",
                         f"{mean['adam'] / mean['zeroone']:.2f}", str(skipped["zeroone"]), deepspeed])
    finally:
        LINK.teardown()
    print_table("Compressed Adam over a tc-limited veth, demo GPT (3.2M params), 2 ranks in 2 namespaces, step ms "
                f"(mean after freeze step {args.freeze_step})",
                ["link", "Adam", "1-bit Adam", "speedup", "0/1 Adam", "speedup", "0/1 skipped rounds",
                 "DeepSpeed 1-bit Adam"], rows)
    write_json(args.out, {"benchmark": "onebit_link", "steps": args.steps, "freeze_step": args.freeze_step,
                          "local_step_scaler": args.local_step_scaler, "deepspeed_onebit": deepspeed,
                          "results": results})


if __name__ == "__main__":
    main()
