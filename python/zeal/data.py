"""The rank-sharded data loader initialize() returns for training_data."""
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler


def distributed_loader(dataset, micro_batch_size, rank, world_size, collate_fn=None, shuffle=True, seed=0):
    """Each rank gets its own 1/world_size of every epoch (DistributedSampler), in micro batches."""
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return DataLoader(dataset, batch_size=micro_batch_size, collate_fn=collate_fn)
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
    return DataLoader(dataset, batch_size=micro_batch_size, sampler=sampler, collate_fn=collate_fn)
