"""DeepSpeed's deepspeed.moe.utils: telling expert parameters from shared ones, and the optimizer
parameter groups DeepSpeed's MoE scripts build."""
from collections import defaultdict

import torch
from torch import nn

from .layer import MoE


def has_moe_layers(m: nn.Module):
    """(whether `m` holds an MoE layer, the first one's num_experts)."""
    for module in m.modules():
        if isinstance(module, MoE):
            return True, module.num_experts
    return False, 0


def is_moe_param(param: torch.Tensor) -> bool:
    return hasattr(param, "allreduce") and not param.allreduce


def split_params_into_shared_and_expert_params(params):
    shared, expert = [], []
    for p in params:
        (expert if is_moe_param(p) else shared).append(p)
    return shared, expert


def split_params_grads_into_shared_and_expert_params(group):
    shared, expert = [], []
    for p in group:
        if p.grad is not None:
            (expert if is_moe_param(p) else shared).append(p.grad.to(p.dtype))
    return shared, expert


def split_params_into_different_moe_groups_for_optimizer(param_groups, max_group_size=178956971):
    """Moves every expert parameter out of its group into a group of its own per (group, expert
    group name), copying the group's options and adding 'name' = the expert group name and
    'moe' = True; a moe group over `max_group_size` elements is cut in several. Edits the given
    groups in place and returns the list with the moe groups appended (DeepSpeed's contract)."""
    if isinstance(param_groups, tuple):
        param_groups = list(param_groups)
    elif isinstance(param_groups, dict):
        param_groups = [param_groups]
    elif not isinstance(param_groups, list):
        raise ValueError(f"Unknown param group type of {type(param_groups)}")
    # Expert group names in first-seen order (DeepSpeed iterates a set; one order on every rank here).
    names = []
    for group in param_groups:
        for p in group["params"]:
            if is_moe_param(p) and p.group_name not in names:
                names.append(p.group_name)
    moe_groups = defaultdict(dict)
    for group in param_groups:
        for name in names:
            moe_groups[group["name"]][name] = {**group, "name": name, "moe": True, "params": []}
    for group in param_groups:
        shared = []
        for p in group["params"]:
            if is_moe_param(p):
                moe_groups[group["name"]][p.group_name]["params"].append(p)
            else:
                shared.append(p)
        group["params"] = shared
    for by_name in moe_groups.values():
        for group in by_name.values():
            if max_group_size is None:
                param_groups.append(group)
                continue
            pieces, piece, size = [], [], 0
            for p in group["params"]:
                n = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                if piece and size + n > max_group_size:
                    pieces.append(piece)
                    piece, size = [], 0
                piece.append(p)
                size += n
            if piece:
                pieces.append(piece)
            for piece in pieces:
                param_groups.append({**group, "params": piece})
    return param_groups


def is_moe_param_group(param_group):
    return param_group.get("moe", False)


def configure_moe_param_groups(model_parameters):
    """model_parameters as the optimizer wants them, with the expert parameters in moe groups."""
    if not isinstance(model_parameters, list):
        raise TypeError("model_parameters must be a list")
    for p in model_parameters:
        if not isinstance(p, (torch.Tensor, dict)):
            raise TypeError("param argument that would be given to the optimizer should be an iterable of Tensors "
                            f"or dicts, but got {type(p)}")
    first = model_parameters[0]
    if isinstance(first, torch.nn.Parameter):
        return split_params_into_different_moe_groups_for_optimizer({"params": model_parameters,
                                                                     "name": "dense-params"})
    if not any("moe" in g for g in model_parameters):
        return split_params_into_different_moe_groups_for_optimizer(model_parameters)
    return model_parameters
