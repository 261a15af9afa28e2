"""Zeal's optimizers as ordinary torch.optim.Optimizers.

CPUAdam runs the vectorised, multithreaded kernel of kernels/cpu/adam.h (AVX-512, AVX2 or scalar,
chosen at run time) on fp32 CPU parameters: the same update as torch.optim.Adam (adamw_mode=False)
or AdamW (adamw_mode=True, the default, as DeepSpeed's DeepSpeedCPUAdam).
"""
import torch

from . import _zeal


class CPUAdam(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, adamw_mode=True):
        if amsgrad:
            raise _zeal.ConfigError("CPUAdam: amsgrad is not supported")
        if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise _zeal.ConfigError(f"CPUAdam: invalid hyper-parameters lr={lr}, betas={betas}, eps={eps}, "
                                    f"weight_decay={weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, adamw_mode=adamw_mode)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.device.type != "cpu":
                    raise _zeal.Error(f"CPUAdam got a parameter on {p.device}; it updates CPU tensors "
                                      "(device parameters need a device optimizer)")
                if p.dtype != torch.float32:
                    raise _zeal.Error(f"CPUAdam got a parameter of dtype {p.dtype}; it keeps float32 parameters "
                                      "and states (keep an fp32 master copy)")

    @staticmethod
    def isa():
        """The instruction set the kernel uses on this CPU: 'avx512', 'avx2' or 'scalar'."""
        return _zeal.cpu_adam_isa()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise _zeal.Error("CPUAdam does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                state["step"] += 1
                if not p.is_contiguous():
                    raise _zeal.Error("CPUAdam needs contiguous parameters (it updates them in place)")
                _zeal.cpu_adam_step(p.data, p.grad.contiguous(),
                                    state["exp_avg"], state["exp_avg_sq"], group["lr"], beta1, beta2, group["eps"],
                                    group["weight_decay"], group["adamw_mode"], group["bias_correction"],
                                    int(state["step"].item()))
        return loss
