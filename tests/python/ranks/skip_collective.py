"""Rank 1 skips an all_reduce. The other ranks must get zeal.TimeoutError naming the op, the group
and rank 1 within the timeout; each prints one RESULT line. Exits without MPI_Finalize (the world
communicator is broken), so the test judges the printed lines, not mpirun's exit code."""
import os
import sys
import time

import torch

import zeal

comm = zeal.world(timeout_s=30)
rank = comm.rank
if rank == 1:
    time.sleep(5)
    print(f"RESULT rank {rank} skipped", flush=True)
    os._exit(0)
start = time.monotonic()
try:
    comm.all_reduce(torch.ones(8), "sum", timeout_s=2.0).wait()
    print(f"RESULT rank {rank} completed-unexpectedly", flush=True)
except zeal.TimeoutError as e:
    waited = time.monotonic() - start
    print(f"RESULT rank {rank} timeout after {waited:.1f}s: {e}", flush=True)
    try:
        comm.barrier().wait()
    except zeal.CommError as e2:
        print(f"RESULT rank {rank} next-op-refused: {e2}", flush=True)
sys.stdout.flush()
time.sleep(1.5)  # the first rank to leave makes mpirun stop the rest: let the others print first
os._exit(0)
