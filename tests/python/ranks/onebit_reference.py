"""The compressed optimizers inside the engine against a plain-torch transcription of the method.

Each rank trains the model twice, side by side, on the same micro batches: once through
zeal.initialize, once as a few lines of torch per step that follow the published algorithm
(DeepSpeed's 0/1 Adam and 1-bit LAMB, docs/compression.md), with the communication done by hand:
a full-precision all-reduce where the method reduces gradients, Zeal's compressed all-reduce
(its own error buffers) where it compresses. The transcription works on the engine's flat layout
(parameters in reverse order, one bucket, padded to the world size), so the compressed chunks are
the same. After every step the parameters must agree to float32 rounding. Interval policies,
local steps, synchronisation, momentum scaling and the LAMB coefficients all show up in them."""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
import zeal  # noqa: E402
from zeal import _zeal  # noqa: E402

LR, WD, B1, B2, EPS = 0.003, 0.01, 0.9, 0.999, 1e-8


class Flat:
    """The engine's flat layout of the reference model's parameters."""

    def __init__(self, params, total):
        self.params = list(params)[::-1]
        self.total = total

    def gather(self, tensors):
        out = torch.zeros(self.total)
        torch.cat([t.reshape(-1) for t in tensors[::-1]], out=out[: sum(t.numel() for t in tensors)])
        return out

    def ranges(self):
        at = 0
        for p in self.params:
            yield at, at + p.numel()
            at += p.numel()

    def data_end(self):
        return sum(p.numel() for p in self.params)


class ZeroOneAdamRef:
    def __init__(self, flat, world, average, var_freeze_step, var_update_scaler, local_step_scaler, clipper):
        n = flat.total
        self.p = flat.gather([p.detach() for p in flat.params[::-1]])
        self.m, self.v = torch.zeros(n), torch.zeros(n)
        self.world, self.average, self.end = world, average, flat.data_end()
        self.vfs, self.vus, self.lss, self.clip = var_freeze_step, var_update_scaler, local_step_scaler, clipper
        self.var_interval, self.var_counter, self.local_interval, self.local_counter = 1, 0, 1, 0
        self.frozen, self.step, self.lrs, self.anchor = False, 0, 0.0, None

    def local_gradients(self):
        return self.frozen or (self.step + 1) % self.var_interval != 0

    def apply(self, p, m, v):
        p.mul_(1 - LR * WD).addcdiv_(m, v.sqrt().add_(EPS), value=-LR)

    def update(self, g):
        self.step += 1
        e = self.end
        p, m, v = self.p[:e], self.m[:e], self.v[:e]
        if not self.frozen:
            var_step = self.step % self.var_interval == 0
            if not var_step and self.world > 1:
                self.average(g)
            m.mul_(B1).add_(g[:e], alpha=1 - B1)
            if var_step:
                v.mul_(B2).addcmul_(g[:e], g[:e], value=1 - B2)
            self.apply(p, m, v)
            if var_step:
                self.var_counter += 1
                if self.var_counter == self.vus:
                    self.var_counter, self.var_interval = 0, self.var_interval * 2
            if self.step >= self.vfs:
                self.frozen, self.anchor = True, self.p.clone()
                self.reset_errors()
            return
        m.mul_(B1).add_(g[:e], alpha=1 - B1)
        self.apply(p, m, v)
        self.anchor[:e].mul_(1 - LR * WD)  # the decay stays out of the move
        self.lrs += LR
        if self.step % self.local_interval == 0:
            move = self.p - self.anchor
            denom = v.sqrt().add_(EPS)
            move[:e].mul_(denom)
            if self.world > 1:
                self.average(move)
            m.copy_(move[:e]).div_(-self.lrs)
            torch.add(self.anchor[:e], move[:e].div_(denom), out=p)
            self.anchor.copy_(self.p)
            self.lrs = 0.0
        self.local_counter += 1
        if self.local_counter == self.lss:
            self.local_counter, self.local_interval = 0, min(self.clip, 2 * self.local_interval)


def norm(x):
    """As the engine takes norms: the square root of a float64 sum of squares."""
    return x.double().pow(2).sum().item() ** 0.5


class OneBitLambRef:
    def __init__(self, flat, world, average, freeze_step, coeff_beta=0.9, fmax=4.0, fmin=0.5, threshold=0.1,
                 min_coeff=0.01, max_coeff=10.0):
        n = flat.total
        self.flat, self.world, self.average = flat, world, average
        self.p = flat.gather([p.detach() for p in flat.params[::-1]])
        self.m, self.v, self.fresh = torch.zeros(n), torch.zeros(n), torch.zeros(n)
        self.freeze_step, self.cb, self.fmax, self.fmin, self.thr = freeze_step, coeff_beta, fmax, fmin, threshold
        self.min_coeff, self.max_coeff = min_coeff, max_coeff
        k = len(flat.params)
        self.coeff_freeze, self.last_factor, self.scaling = [0.0] * k, [1.0] * k, None
        self.step = 0

    def local_gradients(self):
        return self.step >= self.freeze_step

    def update(self, g):
        self.step += 1
        ranges = list(self.flat.ranges())
        if self.step <= self.freeze_step:
            for t, (a, b) in enumerate(ranges):
                p, m, v, gr = self.p[a:b], self.m[a:b], self.v[a:b], g[a:b]
                m.mul_(B1).add_(gr, alpha=1 - B1)
                v.mul_(B2).addcmul_(gr, gr, value=1 - B2)
                u = m / v.sqrt().add_(EPS)
                u.add_(p, alpha=WD)
                wn, un = norm(p), norm(u)
                coeff = min(max(wn / un, self.min_coeff), self.max_coeff) if wn and un else 1.0
                if coeff != 1.0:
                    self.coeff_freeze[t] = self.cb * self.coeff_freeze[t] + (1 - self.cb) * coeff
                p.add_(u, alpha=-LR * coeff)
            if self.step == self.freeze_step:
                self.fresh.copy_(self.v)
            return
        if self.scaling is None:
            rms = [norm(self.m[a:b]) / (b - a) ** 0.5 for a, b in ranges]
            mean = sum(rms) / len(rms)
            self.scaling = [mean / r if r > 0 else 1.0 for r in rms]
        last = self.m.clone()
        for t, (a, b) in enumerate(ranges):
            self.m[a:b].mul_(B1).add_(g[a:b], alpha=1 - B1).mul_(self.scaling[t])
        if self.world > 1:
            self.average(self.m)
        for t, (a, b) in enumerate(ranges):
            p, m, v, fresh = self.p[a:b], self.m[a:b].div_(self.scaling[t]), self.v[a:b], self.fresh[a:b]
            grad = (m - last[a:b] * B1).div_(1 - B1)
            fresh.mul_(B2).addcmul_(grad, grad, value=1 - B2)
            denom = v.sqrt().add_(EPS)
            prelim = m / denom
            update = prelim + p * WD
            factor = (denom / fresh.sqrt().add_(EPS)).max().item()
            ratio = min(1.0, norm(prelim) / norm(update))
            factor = factor * ratio + (1 - ratio)
            factor = min(max(factor, self.fmin), self.fmax)
            last_f = self.last_factor[t]
            factor = min(max(factor, last_f * (1 - self.thr)), last_f * (1 + self.thr))
            self.last_factor[t] = factor
            p.add_(update, alpha=-LR * self.coeff_freeze[t] * factor)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--optimizer", choices=["zerooneadam", "onebitlamb"], required=True)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    micro = 8
    if args.optimizer == "zerooneadam":
        opt = {"type": "ZeroOneAdam", "params": {"lr": LR, "weight_decay": WD, "var_freeze_step": 14,
                                                  "var_update_scaler": 3, "local_step_scaler": 5,
                                                  "local_step_clipper": 4}}
    else:
        opt = {"type": "OneBitLamb", "params": {"lr": LR, "weight_decay": WD, "freeze_step": 12}}
    config = {"train_micro_batch_size_per_gpu": micro, "steps_per_print": 1000, "optimizer": opt,
              "zero_optimization": {"stage": 0, "reduce_bucket_size": 10**9}, "comms_timeout_s": 60}
    model, twin = common.make_model(), common.make_model()
    engine, *_ = zeal.initialize(model=model, config=config)
    comm = zeal.world()
    rank, world = engine.global_rank, engine.world_size
    flat = Flat(twin.parameters(), engine._core.flat_numel)
    state = _zeal.OneBitState()

    def average(t):
        _zeal.compressed_all_reduce(comm, t, state)

    if args.optimizer == "zerooneadam":
        ref = ZeroOneAdamRef(flat, world, average, 14, 3, 5, 4)
        ref.reset_errors = state.reset
    else:
        ref = OneBitLambRef(flat, world, average, 12)
    worst = 0.0
    for step in range(args.steps):
        x, y = common.teacher_batch(step, micro * world)
        rows = common.micro_slice(step, 0, rank, world, micro)
        local = ref.local_gradients()
        engine.backward(common.loss_fn(engine(x[rows]), y[rows]))
        engine.step()
        # The transcription: this rank's gradient, averaged in full precision unless the method
        # keeps it local this step.
        twin.zero_grad()
        common.loss_fn(twin(x[rows]), y[rows]).backward()
        g = flat.gather([p.grad for p in twin.parameters()])
        if not local and world > 1:
            comm.all_reduce(g, "sum").wait()
            g.mul_(1.0 / world)  # as the engine scales the sum
        ref.update(g)
        with torch.no_grad():
            for p, (a, b) in zip(flat.params, flat.ranges()):
                p.copy_(ref.p[a:b].view_as(p))
        got = flat.gather([p.detach() for p in model.parameters()])
        err = ((got - ref.p).abs() / (ref.p.abs() + 1e-3)).max().item()
        worst = max(worst, err)
        assert err < 1e-5, f"step {step + 1} rank {rank}: engine and transcription differ by {err:.3e}"
    if args.optimizer == "zerooneadam":
        assert engine.skipped_comm_rounds > 0, "no local step was taken"
    print(f"REFERENCE-OK rank {rank} worst {worst:.3e} skipped {engine.skipped_comm_rounds}", flush=True)


if __name__ == "__main__":
    main()
