"""1-bit Adam against uncompressed Adam on the demo model: the same run twice at 2 ranks (the demo's
char-level GPT, data, schedule and clipping), once with OneBitAdam (compressed after freeze_step)
and once with AdamW without bias correction (what 1-bit Adam runs before its freeze step). Writes
both loss curves to one PNG, prints the mean loss of the last 50 steps and their ratio, writes JSON.

    python3 benchmarks/onebit_convergence.py --steps 300 --freeze_step 100 --out out/bench/onebit
"""
import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from harness import ROOT, print_table, write_json
from zeal.launcher import local_mpi_env


def run(config, out, steps, ranks):
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    cmd = [sys.executable, "-m", "zeal.launcher", "--num_procs", str(ranks),
           str(ROOT / "examples" / "python" / "train_gpt.py"), "--config", str(out / "config.json"),
           "--out", str(out), "--steps", str(steps)]
    env = {**os.environ, **local_mpi_env()}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    with open(out / "loss.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def smooth(values, window=20):
    return [sum(values[max(0, i - window + 1): i + 1]) / min(window, i + 1) for i in range(len(values))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--freeze_step", type=int, default=100)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--out", default="out/bench/onebit")
    args = ap.parse_args()

    base = json.loads((ROOT / "configs" / "gpt_dp.json").read_text())
    base["scheduler"]["params"]["total_num_steps"] = args.steps
    params = dict(base["optimizer"]["params"])
    adam = {**base, "optimizer": {"type": "AdamW", "params": {**params, "bias_correction": False}}}
    onebit = {**base, "optimizer": {"type": "OneBitAdam", "params": {**params, "freeze_step": args.freeze_step}},
              "comms_logger": {"enabled": False}}
    out = Path(args.out)
    losses = {}
    for name, config in (("adam", adam), ("onebit_adam", onebit)):
        print(f"onebit_convergence: {name}, {args.steps} steps on {args.ranks} ranks ...", flush=True)
        losses[name] = run(config, out / name, args.steps, args.ranks)

    tail = {name: sum(v[-50:]) / len(v[-50:]) for name, v in losses.items()}
    ratio = tail["onebit_adam"] / tail["adam"]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, label in (("adam", "Adam (uncompressed)"), ("onebit_adam", "1-bit Adam")):
        ax.plot(range(1, len(losses[name]) + 1), smooth(losses[name]), lw=2, label=label)
    ax.axvline(args.freeze_step, color="gray", ls="--", lw=1, label=f"freeze_step {args.freeze_step}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/char), 20-step average")
    ax.set_title(f"Demo GPT, {args.ranks} ranks: 1-bit Adam vs Adam")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    print_table("1-bit Adam vs Adam, demo GPT", ["optimizer", "mean loss, last 50 steps", "vs Adam"],
                [["adam", f"{tail['adam']:.4f}", "1.000"],
                 ["onebit_adam", f"{tail['onebit_adam']:.4f}", f"{ratio:.3f}"]])
    write_json(out / "onebit_convergence.json", {"steps": args.steps, "freeze_step": args.freeze_step,
                                                 "ranks": args.ranks, "losses": losses, "tail_mean": tail,
                                                 "ratio": ratio})
    print(f"wrote {out / 'loss.png'}")


if __name__ == "__main__":
    main()
