"""Each rank prints the dataset indices its loader yields for one epoch."""
import torch

import zeal

data = torch.utils.data.TensorDataset(torch.arange(40).float().unsqueeze(1))
engine, _, loader, _ = zeal.initialize(model=torch.nn.Linear(1, 1), training_data=data,
                                       config={"train_micro_batch_size_per_gpu": 5,
                                               "optimizer": {"type": "SGD", "params": {"lr": 0.1}}})
seen = [int(v) for (batch,) in loader for v in batch.reshape(-1)]
sizes = {len(batch) for (batch,) in loader}
print(f"SHARD rank {engine.global_rank} sizes {sorted(sizes)} indices {','.join(map(str, seen))}", flush=True)
