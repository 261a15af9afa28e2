"""ZeRO++ against plain ZeRO-3 on the demo GPT: the same 300 steps, the same data and seed, 4 ranks
as 2 "nodes" of 2 (ZEAL_RANKS_PER_NODE=2, so the comms_logger splits each rank's bytes by node), with
configs/gpt_zero3.json, with configs/gpt_zeropp.json (qwZ + qgZ + hpZ 2), and with the same plus LoCo
(zeropp_loco_param {"err_beta": 0.8, "reset_T": 1024}). Prints each ZeRO++ loss curve's gap to ZeRO-3's
(the mean over windows of 10 steps, and over the last 50 steps), the bytes rank 0 sent off its node in
the last step, writes JSON and draws the curves into one PNG.

    python3 benchmarks/zeropp_convergence.py --steps 300 --out out/bench/zeropp_convergence.json
"""
import argparse
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from harness import print_table, write_json  # noqa: E402

# name: (config, keys set in its zero_optimization)
RUNS = {"ZeRO-3": ("configs/gpt_zero3.json", {}),
        "ZeRO++ (qwZ+qgZ+hpZ 2)": ("configs/gpt_zeropp.json", {}),
        "ZeRO++ + LoCo": ("configs/gpt_zeropp.json", {"zeropp_loco_param": {"err_beta": 0.8, "reset_T": 1024}})}


def run(name, config, zero, steps, ranks, out, seed=0):
    print(f"zeropp_convergence: {name}: {ranks} ranks, {steps} steps ...", flush=True)
    env = {**os.environ, "ZEAL_RANKS_PER_NODE": "2"}
    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((ROOT / config).read_text())
    cfg["comms_logger"] = {"enabled": True}  # every run counts its bytes by node
    cfg["zero_optimization"].update(zero)
    config = out / "config.json"
    config.write_text(json.dumps(cfg))
    proc = subprocess.run(["zeal", "--num_procs", str(ranks), "examples/python/train_gpt.py", "--config", config,
                           "--steps", str(steps), "--out", str(out), "--seed", str(seed)], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    with open(out / "loss.csv") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    m = re.search(r"last step sent ([\d,]+) bytes to its node and ([\d,]+) to other nodes", proc.stdout)
    sent = {"intra_node": int(m.group(1).replace(",", "")), "inter_node": int(m.group(2).replace(",", ""))} if m else None
    m = re.search(r"([\d,]+) tokens/s overall", proc.stdout)
    return {"losses": losses, "last_step_bytes": sent, "tokens_per_s": int(m.group(1).replace(",", "")) if m else None}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--out", default="out/bench/zeropp_convergence.json")
    ap.add_argument("--seed", type=int, default=0, help="the demo's --seed (the model's initialization)")
    args = ap.parse_args()
    work = Path(args.out).resolve().parent / "zeropp_convergence"
    results = {name: run(name, cfg, zero, args.steps, args.ranks, work / str(i), args.seed)
               for i, (name, (cfg, zero)) in enumerate(RUNS.items())}
    base = next(iter(results.values()))["losses"]
    gaps = {}
    for name, r in list(results.items())[1:]:
        lb = r["losses"]
        window = [abs(sum(lb[i:i + 10]) / 10 - sum(base[i:i + 10]) / 10) for i in range(0, len(base) - 9, 10)]
        gaps[name] = {"max_window_gap": max(window), "last50_gap": abs(sum(lb[-50:]) / 50 - sum(base[-50:]) / 50)}
    rows = [[name, f"{r['losses'][0]:.3f}", f"{sum(r['losses'][-50:]) / 50:.4f}",
             "-" if not r["last_step_bytes"] else f"{r['last_step_bytes']['inter_node']:,}",
             "-" if not r["last_step_bytes"] else f"{r['last_step_bytes']['intra_node']:,}", f"{r['tokens_per_s']:,}"]
            for name, r in results.items()]
    print_table(f"Demo GPT, {args.ranks} ranks as 2 nodes, {args.steps} steps",
                ["run", "first loss", "mean loss, last 50", "bytes off node (last step, rank 0)",
                 "bytes on node", "tokens/s"], rows)
    for name, g in gaps.items():
        print(f"{name}: largest gap of 10-step means to ZeRO-3: {g['max_window_gap']:.4f}; "
              f"gap of the last-50 means: {g['last50_gap']:.4f}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for name, r in results.items():
            ax.plot(range(1, len(r["losses"]) + 1), r["losses"], label=name, linewidth=1)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title("Demo GPT: ZeRO-3 and ZeRO++")
        ax.legend()
        png = Path(args.out).with_suffix(".png")
        png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(png, dpi=100, bbox_inches="tight")
        print(f"wrote {png}")
    except ImportError:
        print("matplotlib missing: no plot")
    write_json(args.out, {"benchmark": "zeropp_convergence", "steps": args.steps, "ranks": args.ranks, "seed": args.seed,
                          "runs": results, "gaps": gaps})


if __name__ == "__main__":
    main()
