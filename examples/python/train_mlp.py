"""The README's Python example, runnable: `zeal --num_procs 2 examples/python/train_mlp.py`."""
import torch

import zeal

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
x = torch.randn(1024, 16)
data = torch.utils.data.TensorDataset(x, x[:, :4].sum(dim=1, keepdim=True))
engine, optimizer, loader, scheduler = zeal.initialize(
    model=model, training_data=data, config="configs/mlp.json")
for epoch in range(5):
    loader.sampler.set_epoch(epoch)
    for x, y in loader:
        loss = torch.nn.functional.mse_loss(engine(x), y)   # forward
        engine.backward(loss)                               # scaled backward, bucketed all-reduce
        engine.step()                                       # unscale, clip, optimizer, LR schedule
    if engine.global_rank == 0:
        print(f"epoch {epoch}: loss {loss.item():.4f}, lr {scheduler.get_lr()[0]:.4f}, steps {engine.global_steps}")
