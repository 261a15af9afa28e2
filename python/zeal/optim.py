"""Zeal's CPU optimizers as ordinary torch.optim.Optimizers, on the vectorised, multithreaded
kernels of kernels/cpu/optim_kernels.h (AVX-512, AVX2 or scalar, chosen at run time), for fp32 CPU
parameters:

    CPUAdam     torch.optim.Adam (adamw_mode=False) or AdamW (adamw_mode=True, the default, as
                DeepSpeed's DeepSpeedCPUAdam)
    CPUAdagrad  torch.optim.Adagrad
    CPULamb     LAMB: Adam moments, update u = m_hat / (sqrt(v_hat) + eps) + wd * p, per-tensor
                trust ratio ||p|| / ||u|| clamped to [min_coeff, max_coeff] (DeepSpeed's FusedLamb)

and their multi-tensor CUDA counterparts FusedAdam and FusedLamb (kernels/cuda/), for CUDA
parameters in fp32, bf16 or fp16 with fp32 moments, in a Zeal built with CUDA.
"""
import torch

from . import _zeal


def _check_params(name, param_groups, low_precision=False):
    for group in param_groups:
        for p in group["params"]:
            if p.device.type != "cpu":
                raise _zeal.Error(f"{name} got a parameter on {p.device}; it updates CPU tensors "
                                  "(device parameters need a device optimizer)")
            if low_precision and p.dtype in (torch.bfloat16, torch.float16):
                continue
            if p.dtype != torch.float32:
                raise _zeal.Error(f"{name} got a parameter of dtype {p.dtype}; it keeps float32 parameters "
                                  "and states (keep an fp32 master copy)")


def _grads(name, group):
    # (parameter, contiguous gradient) for the parameters of a group that have a gradient.
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise _zeal.Error(f"{name} does not support sparse gradients")
        if not p.is_contiguous():
            raise _zeal.Error(f"{name} needs contiguous parameters (it updates them in place)")
        yield p, p.grad.contiguous()


def _moments(state, p):
    """Adam-style state in fp32, created zero on first use; advances the step count."""
    if not state:
        state["step"] = torch.tensor(0.0)
        state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
    state["step"] += 1
    return state


class _PerTensorOptimizer(torch.optim.Optimizer):
    """A torch optimizer whose step calls one kernel per parameter (subclasses define _update)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group):
        for p, grad in _grads(type(self).__name__, group):
            self._update(p, grad, group)


class CPUAdam(_PerTensorOptimizer):
    """DeepSpeed's DeepSpeedCPUAdam. fp32_optimizer_states (True, DeepSpeed's default): bf16 or fp16
    parameters are updated with fp32 moments, each step computed in fp32 and rounded back to the
    parameter's dtype; False keeps the moments in the parameters' dtype, which is not supported yet."""

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, adamw_mode=True, fp32_optimizer_states=True):
        if amsgrad:
            raise _zeal.ConfigError("CPUAdam: amsgrad is not supported")
        if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise _zeal.ConfigError(f"CPUAdam: invalid hyper-parameters lr={lr}, betas={betas}, eps={eps}, "
                                    f"weight_decay={weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, adamw_mode=adamw_mode)
        super().__init__(params, defaults)
        if not fp32_optimizer_states and any(p.dtype in (torch.bfloat16, torch.float16)
                                             for g in self.param_groups for p in g["params"]):
            raise _zeal.ConfigError("CPUAdam: fp32_optimizer_states=False (moments in the parameters' bf16/fp16) is "
                                    "not supported yet; keep the default True")
        _check_params("CPUAdam", self.param_groups, low_precision=True)
        self.fp32_optimizer_states = fp32_optimizer_states

    @staticmethod
    def isa():
        """The instruction set the kernel uses on this CPU: 'avx512', 'avx2' or 'scalar'."""
        return _zeal.cpu_adam_isa()

    def _update(self, p, grad, group):
        state = _moments(self.state[p], p)
        beta1, beta2 = group["betas"]
        work = p.data if p.dtype == torch.float32 else p.data.float()  # bf16/fp16: the step in fp32
        _zeal.cpu_adam_step(work, grad.float(), state["exp_avg"], state["exp_avg_sq"], group["lr"], beta1, beta2,
                            group["eps"], group["weight_decay"], group["adamw_mode"], group["bias_correction"],
                            int(state["step"].item()))
        if work is not p.data:
            p.data.copy_(work)


class CPUAdagrad(_PerTensorOptimizer):
    def __init__(self, params, lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0, eps=1e-10):
        if lr < 0 or lr_decay < 0 or weight_decay < 0 or eps < 0 or initial_accumulator_value < 0:
            raise _zeal.ConfigError(f"CPUAdagrad: invalid hyper-parameters lr={lr}, lr_decay={lr_decay}, "
                                    f"weight_decay={weight_decay}, eps={eps}")
        defaults = dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, eps=eps,
                        initial_accumulator_value=initial_accumulator_value)
        super().__init__(params, defaults)
        _check_params("CPUAdagrad", self.param_groups)
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["step"] = torch.tensor(0.0)
                self.state[p]["sum"] = torch.full_like(p, initial_accumulator_value,
                                                       memory_format=torch.contiguous_format)

    def _update(self, p, grad, group):
        state = self.state[p]
        state["step"] += 1
        _zeal.cpu_adagrad_step(p.data, grad, state["sum"], group["lr"], group["lr_decay"], group["weight_decay"],
                               group["eps"], int(state["step"].item()))


class CPULamb(_PerTensorOptimizer):
    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 max_coeff=10.0, min_coeff=0.01):
        if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise _zeal.ConfigError(f"CPULamb: invalid hyper-parameters lr={lr}, betas={betas}, eps={eps}, "
                                    f"weight_decay={weight_decay}")
        if not 0 <= min_coeff <= max_coeff:
            raise _zeal.ConfigError(f"CPULamb: need 0 <= min_coeff <= max_coeff, got {min_coeff}, {max_coeff}")
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=tuple(betas), eps=eps,
                        weight_decay=weight_decay, max_coeff=max_coeff, min_coeff=min_coeff)
        super().__init__(params, defaults)
        _check_params("CPULamb", self.param_groups)

    def _update(self, p, grad, group):
        state = _moments(self.state[p], p)
        beta1, beta2 = group["betas"]
        state["trust_ratio"] = _zeal.cpu_lamb_step(
            p.data, grad, state["exp_avg"], state["exp_avg_sq"], group["lr"], beta1, beta2, group["eps"],
            group["weight_decay"], group["bias_correction"], int(state["step"].item()), group["min_coeff"],
            group["max_coeff"])


class _FusedOptimizer(_PerTensorOptimizer):
    """Multi-tensor CUDA optimizers: one fused launch per (dtype, step count) of a group, with fp32
    moments, instead of one kernel per tensor."""

    _cpu_name = ""

    def __init__(self, params, defaults):
        name = type(self).__name__
        if not hasattr(_zeal, "fused_adam_step"):
            raise _zeal.Error(f"{name} needs Zeal built with CUDA (nvcc was not found at build time)")
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.device.type != "cuda":
                    raise _zeal.Error(f"{name} got a parameter on {p.device}; it updates CUDA tensors "
                                      f"(CPU parameters: {self._cpu_name})")

    def _step_group(self, group):
        by_dtype = {}
        for p, grad in _grads(type(self).__name__, group):
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
            state["step"] += 1
            by_dtype.setdefault((p.dtype, state["step"]), []).append((p, grad, state))
        for (_, step), items in by_dtype.items():
            self._launch(group, step, [p.data for p, _, _ in items], [g for _, g, _ in items],
                         [s["exp_avg"] for _, _, s in items], [s["exp_avg_sq"] for _, _, s in items])


class FusedAdam(_FusedOptimizer):
    """Multi-tensor fused Adam / AdamW for CUDA parameters: up to 36 tensors / 320 chunks of 65536
    elements a launch."""

    _cpu_name = "CPUAdam"

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8, adam_w_mode=True,
                 weight_decay=0.0, amsgrad=False):
        if amsgrad:
            raise _zeal.ConfigError("FusedAdam: amsgrad is not supported")
        super().__init__(params, dict(lr=lr, bias_correction=bias_correction, betas=tuple(betas), eps=eps,
                                      adam_w_mode=adam_w_mode, weight_decay=weight_decay))

    def _launch(self, group, step, params, grads, exp_avg, exp_avg_sq):
        beta1, beta2 = group["betas"]
        _zeal.fused_adam_step(params, grads, exp_avg, exp_avg_sq, group["lr"], beta1, beta2, group["eps"],
                              group["weight_decay"], group["adam_w_mode"], group["bias_correction"], step)


class FusedLamb(_FusedOptimizer):
    """Multi-tensor fused LAMB for CUDA parameters (DeepSpeed's FusedLamb arguments): two launches per
    batch of tensors, the per-tensor norms summed on the device between them."""

    _cpu_name = "CPULamb"

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 max_grad_norm=0.0, max_coeff=10.0, min_coeff=0.01, amsgrad=False):
        if amsgrad or max_grad_norm:
            raise _zeal.ConfigError("FusedLamb: amsgrad and max_grad_norm are not supported "
                                    "(clip with the config's gradient_clipping)")
        if not 0 <= min_coeff <= max_coeff:
            raise _zeal.ConfigError(f"FusedLamb: need 0 <= min_coeff <= max_coeff, got {min_coeff}, {max_coeff}")
        super().__init__(params, dict(lr=lr, bias_correction=bias_correction, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay, max_coeff=max_coeff, min_coeff=min_coeff))

    def _launch(self, group, step, params, grads, exp_avg, exp_avg_sq):
        beta1, beta2 = group["betas"]
        _zeal.fused_lamb_step(params, grads, exp_avg, exp_avg_sq, group["lr"], beta1, beta2, group["eps"],
                              group["weight_decay"], group["bias_correction"], step, group["min_coeff"],
                              group["max_coeff"])
