"""Started by torchrun: forms Zeal's world through the rendezvous and checks a collective."""
import os

import torch

import zeal

comm = zeal.world(timeout_s=60)
rank, size = comm.rank, comm.size
assert rank == int(os.environ["RANK"]) and size == int(os.environ["WORLD_SIZE"]), (rank, size)
t = torch.full((5,), float(rank + 1))
comm.all_reduce(t).wait()
print(f"TORCHRUN rank {rank}/{size} sum {t[0].item():.0f}", flush=True)
