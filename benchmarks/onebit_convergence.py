"""The compressed optimizers against their uncompressed twins on the demo model: the same run at 2
ranks (the demo's char-level GPT, data, schedule and clipping) with
  - AdamW without bias correction (what 1-bit and 0/1 Adam run before they compress),
  - OneBitAdam (compressed after freeze_step),
  - ZeroOneAdam (variance updated on ever sparser steps until freeze_step, --var_update_scaler,
    then local steps; --local_step_scaler and --local_step_clipper set how many rounds it skips),
  - Lamb without bias correction, and OneBitLamb (compressed after freeze_step).
Writes the curves to one PNG (Adam family left, LAMB family right), prints the mean loss of the
last 50 steps and each method's ratio to its twin, writes JSON.

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
    ap.add_argument("--var_update_scaler", type=int, default=16)
    ap.add_argument("--local_step_scaler", type=int, default=32)
    ap.add_argument("--local_step_clipper", type=int, default=4)
    ap.add_argument("--lamb_lr", type=float, default=1e-2)
    ap.add_argument("--only", nargs="*", default=None, help="run only these methods (others are read from --out)")
    args = ap.parse_args()

    base = json.loads((ROOT / "configs" / "gpt_dp.json").read_text())
    base["scheduler"]["params"]["total_num_steps"] = args.steps
    params = dict(base["optimizer"]["params"])
    lamb = {**params, "lr": args.lamb_lr, "bias_correction": False}
    methods = {
        "adam": {"type": "AdamW", "params": {**params, "bias_correction": False}},
        "onebit_adam": {"type": "OneBitAdam", "params": {**params, "freeze_step": args.freeze_step}},
        "zeroone_adam": {"type": "ZeroOneAdam", "params": {
            **params, "var_freeze_step": args.freeze_step, "var_update_scaler": args.var_update_scaler,
            "local_step_scaler": args.local_step_scaler,
            "local_step_clipper": args.local_step_clipper}},
        "lamb": {"type": "Lamb", "params": lamb},
        "onebit_lamb": {"type": "OneBitLamb", "params": {**lamb, "freeze_step": args.freeze_step}},
    }
    twin = {"onebit_adam": "adam", "zeroone_adam": "adam", "onebit_lamb": "lamb"}
    labels = {"adam": "Adam (uncompressed)", "onebit_adam": "1-bit Adam", "zeroone_adam": "0/1 Adam",
              "lamb": "LAMB (uncompressed)", "onebit_lamb": "1-bit LAMB"}
    out = Path(args.out)
    losses = {}
    for name, optimizer in methods.items():
        if args.only is not None and name not in args.only:
            with open(out / name / "loss.csv") as f:
                losses[name] = [float(r["loss"]) for r in csv.DictReader(f)]
            continue
        print(f"onebit_convergence: {name}, {args.steps} steps on {args.ranks} ranks ...", flush=True)
        losses[name] = run({**base, "optimizer": optimizer}, out / name, args.steps, args.ranks)

    tail = {name: sum(v[-50:]) / len(v[-50:]) for name, v in losses.items()}
    ratio = {name: tail[name] / tail[twin[name]] for name in twin}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    for ax, family, title in ((axes[0], ("adam", "onebit_adam", "zeroone_adam"), "Adam family"),
                              (axes[1], ("lamb", "onebit_lamb"), "LAMB family")):
        for name in family:
            ax.plot(range(1, len(losses[name]) + 1), smooth(losses[name]), lw=2, label=labels[name])
        ax.axvline(args.freeze_step, color="gray", ls="--", lw=1, label=f"freeze step {args.freeze_step}")
        ax.set_xlabel("step")
        ax.set_title(f"Demo GPT, {args.ranks} ranks: {title}")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("cross-entropy (nats/char), 20-step average")
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    rows = [[name, f"{tail[name]:.4f}", twin.get(name, "-"), f"{ratio[name]:.3f}" if name in ratio else "1.000"]
            for name in methods]
    print_table("Compressed optimizers vs their uncompressed twins, demo GPT",
                ["optimizer", "mean loss, last 50 steps", "twin", "vs twin"], rows)
    write_json(out / "onebit_convergence.json", {"steps": args.steps, "freeze_step": args.freeze_step,
                                                 "ranks": args.ranks, "var_update_scaler": args.var_update_scaler,
                                                 "local_step_scaler": args.local_step_scaler,
                                                 "local_step_clipper": args.local_step_clipper,
                                                 "lamb_lr": args.lamb_lr, "losses": losses, "tail_mean": tail,
                                                 "ratio": ratio})
    print(f"wrote {out / 'loss.png'}")


if __name__ == "__main__":
    main()
