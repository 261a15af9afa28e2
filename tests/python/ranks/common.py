"""The model, data and reference shared by the equivalence tests.

Every test trains the same small model on the same global batches two ways: with Zeal on N ranks
(rank r taking its slice of each micro batch) and as one plain-torch process on the whole
global batch. The two must end with the same parameters.
"""
import torch

IN, HIDDEN, OUT = 12, 48, 3


def check(cond, message):
    """A rank script's assertion: raises whatever python -O does with `assert`."""
    if not cond:
        raise AssertionError(message)


def close(a, b, what, tol=1e-5):
    """`a` equals the reference `b` to `tol` relative to b's largest magnitude."""
    err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
    check(err <= tol, f"{what}: relative error {err:.3e}")


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(), torch.nn.LayerNorm(HIDDEN),
        torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.GELU(), torch.nn.Linear(HIDDEN, OUT))


def global_batch(step, size, seed=1):
    g = torch.Generator().manual_seed(seed * 100003 + step)
    x = torch.randn(size, IN, generator=g)
    y = torch.randn(size, OUT, generator=g)
    return x, y


def teacher_batch(step, size, seed=2):
    """A learnable task (convergence tests): targets from a fixed random teacher, tanh(x W)."""
    x, _ = global_batch(step, size, seed)
    w = torch.randn(IN, OUT, generator=torch.Generator().manual_seed(12345)) / IN ** 0.5
    return x, torch.tanh(3.0 * x @ w)


def micro_slice(step, micro_index, rank, world, micro):
    """Rows of the global batch that rank `rank` uses in micro step `micro_index`."""
    start = (micro_index * world + rank) * micro
    return slice(start, start + micro)


def loss_fn(out, y):
    return torch.nn.functional.mse_loss(out.float(), y.float())


def reference_run(steps, batch, lr, weight_decay, clip, dtype=torch.float32, optimizer="adamw", gas=1, device="cpu",
                  loss_scale=1.0):
    """Single-process torch: AdamW (or SGD with momentum 0.9) on fp32 master weights, the model in `dtype`.
    With gas > 1 each step accumulates .grad (in `dtype`, as plain torch does) over gas equal
    blocks of the global batch, the blocks Zeal's micro steps cover. A loss_scale multiplies the loss
    before backward and divides the fp32 gradients after (static fp16 loss scaling). Returns the
    weights on the CPU."""
    model = make_model().to(device)
    master = [p.detach().clone().float() for p in model.parameters()]
    model.to(dtype)
    for p, m in zip(model.parameters(), master):
        p.data.copy_(m.to(dtype))
    master_params = [torch.nn.Parameter(m) for m in master]
    if optimizer == "sgd":
        opt = torch.optim.SGD(master_params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    elif optimizer == "adagrad":
        opt = torch.optim.Adagrad(master_params, lr=lr, weight_decay=weight_decay, lr_decay=0.01,
                                  initial_accumulator_value=0.1)
    elif optimizer == "lamb":
        opt = Lamb(master_params, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.AdamW(master_params, lr=lr, weight_decay=weight_decay)
    for step in range(steps):
        x, y = global_batch(step, batch)
        x, y = x.to(device), y.to(device)
        model.zero_grad()
        block = batch // gas
        for k in range(gas):
            rows = slice(k * block, (k + 1) * block)
            (loss_fn(model(x[rows].to(dtype)), y[rows]) * loss_scale / gas).backward()
        for p, m in zip(model.parameters(), master_params):
            m.grad = p.grad.float() / loss_scale
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(master_params, clip)
        opt.step()
        with torch.no_grad():
            for p, m in zip(model.parameters(), master_params):
                p.copy_(m.to(dtype))
    return [m.detach().cpu() for m in master_params]


class Lamb(torch.optim.Optimizer):
    """LAMB written out plainly (DeepSpeed's FusedLamb: bias-corrected Adam update plus decoupled
    weight decay, scaled per tensor by ||p|| / ||u|| clamped to [0.01, 10], 1 when a norm is 0)."""

    def __init__(self, params, lr, weight_decay, betas=(0.9, 0.999), eps=1e-8):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state["step"], state["m"], state["v"] = 0, torch.zeros_like(p), torch.zeros_like(p)
                state["step"] += 1
                m, v, t = state["m"], state["v"], state["step"]
                m.mul_(b1).add_(p.grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                u = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + group["eps"]) + group["weight_decay"] * p
                pn, un = p.norm().item(), u.norm().item()
                ratio = min(10.0, max(0.01, pn / un)) if pn > 0 and un > 0 else 1.0
                p.add_(u, alpha=-group["lr"] * ratio)


def save_gathered(model, rank, path):
    """Rank 0 saves every parameter whole (gathered first when ZeRO-3 has them partitioned)."""
    import zeal

    with zeal.zero.GatheredParameters(list(model.parameters())):
        if rank == 0:
            torch.save([p.detach().clone() for p in model.parameters()], path)
