"""The Hugging Face Trainer on Zeal against the Trainer on real DeepSpeed, in one run: the same
unmodified script (tests/python/hf/trainer_script.py, a GPT-2 built from a config), the same
transformers-style ZeRO configs ("auto" values), torchrun on this machine's CPUs. Zeal comes in
through `zeal-deepspeed install --target` (a directory on PYTHONPATH); DeepSpeed is the pinned
real one (scripts/install-bench-deps), on its CPU accelerator. Reported per case: the Trainer's
train_runtime for the steps (start-up and DeepSpeed's one-time op builds excluded), the final
loss, and rank 0's peak resident memory.

    scripts/install-bench-deps
    python benchmarks/hf_trainer.py --steps 20 --out out/bench/hf_trainer.json
"""
import argparse
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "python" / "hf" / "trainer_script.py"


def config(stage, optimizer):
    cfg = {"fp16": {"enabled": "auto"}, "bf16": {"enabled": "auto"}, "train_batch_size": "auto",
           "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
           "gradient_clipping": "auto", "steps_per_print": 1000,
           "zero_optimization": {"stage": stage, "reduce_bucket_size": "auto"}}
    if stage == 3:
        cfg["zero_optimization"].update(stage3_prefetch_bucket_size="auto", stage3_param_persistence_threshold="auto")
    if optimizer:
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                        "weight_decay": "auto"}}
    return cfg


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(peer, ranks, cfg, args, work, shim):
    out_json = work / f"{peer}_{ranks}_{cfg['zero_optimization']['stage']}.json"
    cfg_path = work / "ds.json"
    cfg_path.write_text(json.dumps(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = str(shim) if peer == "zeal" else ""
    if peer == "deepspeed":
        env["DS_ACCELERATOR"] = "cpu"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
           str(free_port()), str(SCRIPT), "--output_dir", str(work / "out"), "--per_device_train_batch_size", "4",
           "--gradient_accumulation_steps", "2", "--learning_rate", "1e-3", "--max_steps", str(args.steps),
           "--logging_steps", "1", "--save_strategy", "no", "--seed", "7", "--report_to", "none",
           "--disable_tqdm", "true", "--deepspeed", str(cfg_path), "--out", str(out_json),
           "--n_embd", str(args.n_embd), "--n_layer", str(args.n_layer), "--seq", str(args.seq)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    if proc.returncode != 0:
        lines = [l for l in (proc.stdout + proc.stderr).splitlines()
                 if ("Error:" in l or "Error " in l) and "To enable traceback" not in l]
        return {"error": (lines[0].split("]: ", 1)[-1] if lines else f"exit {proc.returncode}")[-300:]}
    r = json.loads(out_json.read_text())
    return {"step_s": r["train_runtime"] / args.steps, "final_loss": r["losses"][-1], "max_rss_mb": r["max_rss_mb"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--n_embd", type=int, default=256)
    parser.add_argument("--n_layer", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--out", default="out/bench/hf_trainer.json")
    args = parser.parse_args()
    have_ds = importlib.util.find_spec("deepspeed") is not None
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shim = work / "shim"
        subprocess.run([shutil.which("zeal-deepspeed"), "install", "--target", str(shim), "--force"], check=True,
                       capture_output=True)
        for ranks in (1, 2):
            for stage, optimizer in ((2, True), (3, False)):
                cfg = config(stage, optimizer)
                for peer in ("zeal", "deepspeed") if have_ds else ("zeal",):
                    row = {"peer": peer, "ranks": ranks, "stage": stage,
                           "optimizer": "config AdamW" if optimizer else "Trainer's torch AdamW",
                           **run(peer, ranks, cfg, args, work, shim)}
                    results.append(row)
                    print(json.dumps(row), flush=True)
    print(f"\n{'ranks':>5} {'stage':>5} {'optimizer':<22} {'peer':<10} {'step (ms)':>10} {'loss':>8} {'peak RSS (MB)':>14}")
    for r in results:
        if "error" in r:
            print(f"{r['ranks']:>5} {r['stage']:>5} {r['optimizer']:<22} {r['peer']:<10} fails: {r['error']}")
        else:
            print(f"{r['ranks']:>5} {r['stage']:>5} {r['optimizer']:<22} {r['peer']:<10} {1e3 * r['step_s']:>10.1f} "
                  f"{r['final_loss']:>8.4f} {r['max_rss_mb']:>14.0f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
