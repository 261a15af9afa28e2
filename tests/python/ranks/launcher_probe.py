"""Run under the zeal launcher: prints the rank variables; with --fail_rank R that rank exits 3."""
import argparse
import os
import sys

ap = argparse.ArgumentParser()
ap.add_argument("--fail_rank", type=int, default=-1)
ap.add_argument("--kill_rank", type=int, default=-1, help="this rank kills itself with SIGKILL")
ap.add_argument("--sleep", type=float, default=0.0, help="every rank sleeps this long, then exits 0")
ap.add_argument("--local_rank", type=int, default=-1)
ap.add_argument("--tag", default="", help="a unique word the tests look for in the process table")
args = ap.parse_args()
env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
                                      "ZEAL_PROBE_FORWARDED", "CUDA_VISIBLE_DEVICES")}
print("PROBE " + " ".join(f"{k}={v}" for k, v in env.items()) + f" local_rank_arg={args.local_rank} pid={os.getpid()}",
      flush=True)
if int(env["RANK"]) == args.kill_rank:
    import signal

    os.kill(os.getpid(), signal.SIGKILL)
if args.sleep:
    import time

    time.sleep(args.sleep)
if int(env["RANK"]) == args.fail_rank:
    print("failing on purpose", file=sys.stderr, flush=True)
    sys.exit(3)
if args.fail_rank >= 0 or args.kill_rank >= 0:
    import time

    time.sleep(60)  # the launcher must stop this rank once the other fails
