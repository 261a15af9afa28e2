"""Per-rank memory of the training state, predicted from Zeal's own layout rules.

    zeal.estimate_memory(model_or_param_count, config, world_size)   -> {stage: {...bytes}}
    zeal-estimate-memory --params 1.3e9 --world_size 8 --config ds.json

What each stage keeps per rank (Psi parameters, N ranks, b bytes per model-dtype element):

    stage  params        grads          fp32 master        optimizer state (Adam: 8 per element)
    0      b Psi         b Psi          4 Psi (0 if fp32)  8 Psi
    1      b Psi         b Psi          4 Psi / N          8 Psi / N
    2      b Psi         b Psi / N      4 Psi / N          8 Psi / N
    3      b Psi / N     b Psi / N      4 Psi / N          8 Psi / N

With b = 2 (bf16/fp16) and Adam these are the ZeRO paper's 16 Psi, 4 Psi + 12 Psi / N,
2 Psi + 14 Psi / N and 16 Psi / N. Element counts include the padding Zeal adds (buckets
padded to a multiple of N; at stage 3 every parameter padded to a multiple of N). Transient
buffers come on top and are reported separately: gradient staging of up to three
reduce_bucket_size buckets in flight (stages 2, 3), and at stage 3 the gathered parameters
(those at or under stage3_param_persistence_threshold stay whole, plus the module running and
the prefetch window).
"""
import argparse
import json
import sys

_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
_STATE = {"adam": 8, "adamw": 8, "sgd": 4}


def _numels(model_or_count):
    """The trainable parameters' sizes and their sum, and the frozen ones' sizes (none for a count)."""
    if isinstance(model_or_count, (int, float)):
        return None, int(model_or_count), []
    params = list(model_or_count.parameters())  # held, so ids stay unique while we dedupe
    seen, numels, frozen = set(), [], []
    for p in params:
        if id(p) in seen:
            continue
        seen.add(id(p))
        (numels if p.requires_grad else frozen).append(int(getattr(p, "ds_numel", p.numel())))
    return numels, sum(numels), frozen


def _frozen_bytes(frozen, n, b, threshold, quantized):
    """Stage 3: what a rank keeps of the frozen parameters (Note [Frozen parameters]): its chunk of
    each, as 8-bit blocks with zero_quantized_nontrainable_weights unless persistent."""
    from . import _zeal

    total = 0
    for x in frozen:
        c = (x + n - 1) // n
        stored = quantized and x > threshold and c > 0
        total += _zeal.quantized_wire_bytes(c, 8, _zeal.WEIGHT_BLOCK) if stored else b * c
    return total


def _precision(config):
    if config.get("fp16", {}).get("enabled", False):
        return "fp16"
    if config.get("bf16", config.get("bfloat16", {})).get("enabled", False):
        return "bf16"
    return "fp32"


def paper_formula(psi, world, stage):
    """The ZeRO paper's model-state bytes for mixed-precision Adam."""
    return {0: 16 * psi, 1: 4 * psi + 12 * psi / world, 2: 2 * psi + 14 * psi / world, 3: 16 * psi / world}[stage]


def estimate_memory(model_or_param_count, config=None, world_size=1, stages=(0, 1, 2, 3)):
    """Predicted per-rank bytes of the training state at each ZeRO stage (keys: params, grads,
    master, optimizer, total, transient, paper). `config` is a DeepSpeed/Zeal config dict or path."""
    from .config import load_config

    config = load_config(config or {"train_batch_size": world_size}, None, None)
    numels, psi, frozen = _numels(model_or_param_count)
    n = int(world_size)
    precision = _precision(config)
    b = _BYTES[precision]
    opt = config.get("optimizer", {"type": "AdamW"})
    per_elem = _STATE.get(str(opt.get("type", "AdamW")).lower(), 8)
    if per_elem == 4 and not opt.get("params", {}).get("momentum", 0.0):
        per_elem = 0  # plain SGD keeps no state
    zero = config.get("zero_optimization", {})
    bucket = int(zero.get("reduce_bucket_size", 5e8))
    threshold = int(zero.get("stage3_param_persistence_threshold", zero.get("param_persistence_threshold", 1e5)))
    prefetch = int(zero.get("stage3_prefetch_bucket_size", zero.get("prefetch_bucket_size", 5e7)))

    if numels is None:
        flat, per_param_padded, persistent = psi, psi, 0
    else:
        flat = psi + n * (1 + psi // max(bucket, 1))  # at most N - 1 padding elements per bucket
        per_param_padded = sum((x + n - 1) // n * n for x in numels)
        persistent = sum((x + n - 1) // n * n for x in numels if x <= threshold)
    out = {}
    for stage in stages:
        if stage == 0:
            s = {"params": b * flat, "grads": b * flat, "master": 0 if b == 4 else 4 * flat,
                 "optimizer": per_elem * flat}
        elif stage in (1, 2):
            shard = flat / n
            s = {"params": b * flat, "grads": b * (flat if stage == 1 else shard), "master": 4 * shard,
                 "optimizer": per_elem * shard}
        else:
            shard = per_param_padded / n
            s = {"params": b * shard, "grads": b * shard, "master": 4 * shard, "optimizer": per_elem * shard}
            # stage 3 partitions frozen parameters too (below it they stay the model's, whole)
            s["params"] += _frozen_bytes(frozen, n, b, threshold, bool(zero.get("zero_quantized_nontrainable_weights")))
        s = {k: int(v) for k, v in s.items()}
        s["total"] = sum(s.values())
        transient = 0
        if stage >= 2:
            transient += 3 * b * min(bucket if stage == 2 else max(numels or [psi]), flat)
        if stage == 3:
            transient += b * (persistent + min(prefetch, per_param_padded) + max(numels or [psi]))
            transient += b * sum((x + n - 1) // n * n for x in frozen if x <= threshold)  # persistent frozen, whole
        s["transient"] = int(transient)
        s["paper"] = int(paper_formula(psi, n, stage))
        out[stage] = s
    return out


def _gib(x):
    return f"{x / 2**30:.2f}"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="zeal-estimate-memory",
                                 description="Per-rank training-state memory at each ZeRO stage.")
    ap.add_argument("--params", type=float, required=True, help="number of trainable parameters, e.g. 1.3e9")
    ap.add_argument("--world_size", type=int, default=1)
    ap.add_argument("--config", default=None, help="a DeepSpeed/Zeal JSON config (precision, optimizer, buckets)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    est = estimate_memory(int(args.params), args.config, args.world_size)
    if args.json:
        print(json.dumps(est, indent=2))
        return 0
    print(f"{int(args.params):,} parameters on {args.world_size} ranks (GiB per rank)")
    cols = ["stage", "params", "grads", "master", "optimizer", "total", "paper formula", "transient"]
    print("  ".join(f"{c:>13}" for c in cols))
    for stage, s in est.items():
        vals = [str(stage)] + [_gib(s[k]) for k in ("params", "grads", "master", "optimizer", "total", "paper",
                                                    "transient")]
        print("  ".join(f"{v:>13}" for v in vals))
    return 0


if __name__ == "__main__":
    sys.exit(main())
