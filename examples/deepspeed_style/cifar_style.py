"""An image classifier trained the way DeepSpeed's CIFAR-10 tutorial trains one, written only
against DeepSpeed's public API. The one Zeal line is the import; run it with

    zeal --num_procs 2 examples/deepspeed_style/cifar_style.py --deepspeed --deepspeed_config examples/deepspeed_style/ds_config.json

(or with the deepspeed launcher and `import deepspeed`). The data is synthetic, CIFAR-shaped
(3x16x16 images, 10 classes: a fixed random pattern per class under noise), so nothing is
downloaded.
"""
import argparse
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import zeal as deepspeed  # the only Zeal-specific line: DeepSpeed's API from here on


def add_argument():
    parser = argparse.ArgumentParser(description="CIFAR-style classifier")
    parser.add_argument("--epochs", type=int, default=4, help="passes over the training set")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the launcher")
    parser.add_argument("--checkpoint_dir", default=None, help="save here after training, then load and check")
    parser = deepspeed.add_config_arguments(parser)
    return parser.parse_args()


class SyntheticCifar(torch.utils.data.Dataset):
    def __init__(self, size, seed):
        g = torch.Generator().manual_seed(seed)
        patterns = torch.randn(10, 3, 16, 16, generator=torch.Generator().manual_seed(99))
        self.labels = torch.randint(0, 10, (size,), generator=g)
        self.images = 0.5 * patterns[self.labels] + torch.randn(size, 3, 16, 16, generator=g)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        return self.fc2(F.relu(self.fc1(x)))


def evaluate(engine, data, device):
    engine.eval()
    with torch.no_grad():
        images, labels = data.images.to(device), data.labels.to(device)
        logits = engine(images)
        loss = F.cross_entropy(logits, labels).item()
        accuracy = (logits.argmax(1) == labels).float().mean().item()
    engine.train()
    return loss, accuracy


def main():
    args = add_argument()
    torch.manual_seed(42)
    trainset, testset = SyntheticCifar(512, seed=1), SyntheticCifar(256, seed=2)
    net = Net()
    parameters = filter(lambda p: p.requires_grad, net.parameters())
    model_engine, optimizer, trainloader, _ = deepspeed.initialize(
        args=args, model=net, model_parameters=parameters, training_data=trainset)
    device = deepspeed.get_accelerator().device_name(model_engine.local_rank)
    rank = model_engine.global_rank
    first = evaluate(model_engine, testset, device)
    if rank == 0:
        print(f"before training: test loss {first[0]:.4f}, accuracy {first[1]:.3f}", flush=True)
    for epoch in range(args.epochs):
        running = 0.0
        for i, (inputs, labels) in enumerate(trainloader):
            inputs, labels = inputs.to(device), labels.to(device)
            loss = F.cross_entropy(model_engine(inputs), labels)
            model_engine.backward(loss)
            model_engine.step()
            running += loss.item()
        if rank == 0:
            print(f"epoch {epoch + 1}: train loss {running / (i + 1):.4f}, lr {model_engine.get_lr()[0]:.2e}",
                  flush=True)
    final = evaluate(model_engine, testset, device)
    if rank == 0:
        print(f"after training: test loss {final[0]:.4f}, accuracy {final[1]:.3f}", flush=True)
    if args.checkpoint_dir:
        model_engine.save_checkpoint(args.checkpoint_dir, client_state={"epochs": args.epochs})
        fresh = Net()
        engine2, *_ = deepspeed.initialize(args=args, model=fresh, model_parameters=fresh.parameters())
        path, client_state = engine2.load_checkpoint(args.checkpoint_dir)
        again = evaluate(engine2, testset, device)
        if rank == 0:
            print(f"loaded {os.path.basename(path)} (epochs {client_state['epochs']}, step {engine2.global_steps}): "
                  f"test loss {again[0]:.4f}", flush=True)


if __name__ == "__main__":
    main()
