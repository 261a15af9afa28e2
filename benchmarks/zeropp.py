"""ZeRO++ over a slow link between two "nodes": 4 ranks in two network namespaces (2 ranks each)
joined by a veth pair whose bandwidth `tc` limits (token bucket); inside a namespace ranks talk over
its own stack, between them every byte crosses the limited link. The demo GPT (3.2M parameters)
under ZeRO-3, then ZeRO-3 with each of qwZ, hpZ (nodes of 2), qgZ, all three, all three with LoCo
(zeropp_loco_param), and MiCS with shard groups of 2 (one per node): the bytes rank 0
sends off its node per step (the comms logger, Note [Bytes within and across nodes]), the mean step
time and the loss after the steps, at each link rate. DeepSpeed's ZeRO++ is probed on its CPU
accelerator and reported as run or not run, with the reason.

Needs root (ip netns, tc). The namespaces and links are removed at the end.

    python3 benchmarks/zeropp.py --rates unlimited 10gbit 1gbit --steps 12 --out out/bench/zeropp.json
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from harness import ROOT, LinkedNamespaces, print_table, write_json

LINK = LinkedNamespaces("zealzpp", "10.213.10")
VARIANTS = {
    "ZeRO-3": {},
    "+qwZ": {"zero_quantized_weights": True},
    "+hpZ": {"zero_hpz_partition_size": 2},
    "+qgZ": {"zero_quantized_gradients": True},
    "+all three": {"zero_quantized_weights": True, "zero_hpz_partition_size": 2, "zero_quantized_gradients": True},
    "+all three +LoCo": {"zero_quantized_weights": True, "zero_hpz_partition_size": 2, "zero_quantized_gradients": True,
                         "zeropp_loco_param": {"err_beta": 0.8, "reset_T": 1024}},
    "MiCS 2 (shard within the node)": {"mics_shard_size": 2},
}
WARMUP = 2


RANK_SCRIPT = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
import torch
import zeal
from gpt import GPT
zeropp, steps = json.loads(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(1)
rank = int(os.environ["RANK"])
torch.manual_seed(0)
model = GPT(96, block=128)
config = {"train_micro_batch_size_per_gpu": 8, "steps_per_print": 10**9,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}},
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 10000, **zeropp},
          "comms_logger": {"enabled": True}, "comms_timeout_s": 600}
engine, *_ = zeal.initialize(model=model, config=config)
times, sent = [], []
for step in range(steps):
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randint(0, 96, (8, 128), generator=g)
    y = torch.randint(0, 96, (8, 128), generator=g)
    zeal.world().barrier().wait()
    t0 = time.perf_counter()
    loss = engine(x, y)
    engine.backward(loss)
    engine.step()
    zeal.world().barrier().wait()
    times.append(time.perf_counter() - t0)
    sent.append(engine.comms_step_bytes())
total = torch.tensor([loss.item()])
zeal.world().all_reduce(total, "sum").wait()
if rank == 0:
    print("RESULT " + json.dumps({"times": times, "sent": sent, "loss": total.item() / 4}), flush=True)
"""


def run(zeropp, steps, port):
    script = Path("/tmp/zeal_zeropp_rank.py")
    script.write_text(RANK_SCRIPT)
    outs = LINK.run_ranks(script, [ROOT / "examples" / "python", json.dumps(zeropp), steps], 4, port, str(zeropp), 1800)
    line = next(x for x in outs[0].splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


DS_PROBE = r"""
import os, torch, deepspeed
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29777")
deepspeed.init_distributed("gloo")
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 4))
config = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
          "zero_optimization": {"stage": 3, "zero_quantized_weights": True, "zero_quantized_gradients": True}}
engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
loss = engine(torch.randn(2, 64)).sum()
engine.backward(loss)
engine.step()
print("DS-ZEROPP-RAN")
"""


def deepspeed_zeropp():
    """Whether DeepSpeed's ZeRO++ (qwZ + qgZ) runs on its CPU accelerator, in words for the table."""
    proc = subprocess.run([sys.executable, "-c", DS_PROBE], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    if "DS-ZEROPP-RAN" in proc.stdout:
        return "runs (not timed here)"
    lines = [x for x in (proc.stderr or proc.stdout).strip().splitlines() if x.strip()]
    return "not run: " + (lines[-1][:160] if lines else f"exit {proc.returncode}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", nargs="+", default=["unlimited", "10gbit", "1gbit"])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                    help="the variants to run (the first is the baseline of the ratios)")
    ap.add_argument("--out", default="out/bench/zeropp.json")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("benchmarks/zeropp.py needs root (ip netns, tc)")
    deepspeed = deepspeed_zeropp()
    print(f"DeepSpeed ZeRO++ on the CPU accelerator: {deepspeed}", flush=True)
    results, rows, port = [], [], 29910
    try:
        for rate in args.rates:
            LINK.setup(rate)
            base = None
            for name in args.variants:
                zeropp = VARIANTS[name]
                port += 1
                print(f"zeropp: {rate}, {name}, {args.steps} steps ...", flush=True)
                r = run(zeropp, args.steps, port)
                steady = r["sent"][WARMUP:]
                inter = statistics.mean(s["inter_node"] for s in steady)
                intra = statistics.mean(s["intra_node"] for s in steady)
                step_s = statistics.mean(r["times"][WARMUP:])
                base = base or {"inter": inter, "step": step_s}
                results.append({"rate": rate, "variant": name, "config": zeropp, "inter_node_bytes": inter,
                                "intra_node_bytes": intra, "step_s": step_s, "times_s": r["times"], "loss": r["loss"]})
                rows.append([rate, name, f"{inter:,.0f}", f"{inter / base['inter']:.2f}", f"{intra:,.0f}",
                             f"{step_s * 1e3:.0f}", f"{base['step'] / step_s:.2f}", f"{r['loss']:.4f}"])
    finally:
        LINK.teardown()
    print_table(f"ZeRO++ over a tc-limited veth: demo GPT (3.2M params), 4 ranks as 2 nodes of 2, {args.steps} steps "
                f"(means after {WARMUP}); bytes are rank 0's per step",
                ["link", "variant", "bytes off node", "/ ZeRO-3", "bytes on node", "step ms", "speedup", "loss"], rows)
    print(f"DeepSpeed ZeRO++ (CPU accelerator): {deepspeed}")
    write_json(args.out, {"benchmark": "zeropp", "steps": args.steps, "warmup": WARMUP, "deepspeed_zeropp": deepspeed,
                          "results": results})


if __name__ == "__main__":
    main()
