"""Run under the zeal launcher: prints the rank variables; with --fail_rank R that rank exits 3."""
import argparse
import os
import sys

ap = argparse.ArgumentParser()
ap.add_argument("--fail_rank", type=int, default=-1)
args = ap.parse_args()
env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
print("PROBE " + " ".join(f"{k}={v}" for k, v in env.items()), flush=True)
if int(env["RANK"]) == args.fail_rank:
    print("failing on purpose", file=sys.stderr, flush=True)
    sys.exit(3)
if args.fail_rank >= 0:
    import time

    time.sleep(60)  # the launcher must stop this rank once the other fails
