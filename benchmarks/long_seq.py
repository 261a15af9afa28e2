"""Long sequences: how long a sequence trains within a per-rank memory cap at Ulysses degree 1, 2
and 4, with and without ALST's tiling, and Zeal's DistributedAttention against DeepSpeed's on the
same model in the same run.

Model: the demo's causal GPT (--shape demo: width 256, 4 layers, 4 heads, vocab 96; or --shape
narrow: width 64, 2 layers, 4 heads, vocab 512), MLP 4x, torch's scaled_dot_product_attention as
the local attention (memory linear in the sequence), the sequence split over P ranks (data 1). One step is forward + sharded cross-entropy + backward (the optimizer
step is left out; it does not depend on the sequence).

    Zeal       zeal.sequence.layer.DistributedAttention over Zeal's MPI communicator, the loss
               zeal.sequence.cross_entropy.sequence_parallel_cross_entropy; "tiled": the MLPs as
               TiledMLP and the logits + loss as TiledFusedLogitsLoss (tiles of 1024 positions)
    DeepSpeed  deepspeed.sequence.layer.DistributedAttention (DS_ACCELERATOR=cpu, torch's gloo), the
               loss vocab_sequence_parallel_cross_entropy and a masked mean

Part 1 doubles the sequence from 2048 until a rank's peak RSS growth passes the cap (--cap_mib) and
reports the longest that stayed under, with its step time. Part 2 times both systems at one length
(--seq) and checks the all-to-all bytes each Zeal rank sent against Ulysses' volume, 4 x (N/P) x h
x (P-1)/P elements per layer each way (the paper's 4Nh/P per link, less the share a rank keeps).
CPU activation offload is not in the table: on a host without a device the activations are already
in host memory.

    python benchmarks/long_seq.py --cap_mib 512 --out out/bench/long_seq.json
"""
import argparse
import importlib.util
import json
import os
import re
import resource
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from harness import mpirun, print_table, rss_bytes, time_steps, write_json  # noqa: E402

TILE = 1024
# The demo's GPT (examples/python/gpt.py: width 256, 4 layers, 4 heads, its 96-character vocabulary)
# and a narrow one that reaches longer sequences in the same time on 2 cores.
SHAPES = {"demo": (96, 256, 4, 4), "narrow": (512, 64, 4, 2)}
V, D, HEADS, LAYERS = SHAPES["demo"]


def set_shape(name):
    global V, D, HEADS, LAYERS
    V, D, HEADS, LAYERS = SHAPES[name]


def build(attention_factory, tiled):
    import torch
    import torch.nn.functional as F

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = torch.nn.LayerNorm(D), torch.nn.LayerNorm(D)
            self.qkv, self.proj = torch.nn.Linear(D, 3 * D, bias=False), torch.nn.Linear(D, D)
            self.mlp = torch.nn.Sequential(torch.nn.Linear(D, 4 * D), torch.nn.GELU(), torch.nn.Linear(4 * D, D))
            self.attention = attention_factory()

        def forward(self, x):
            b, s, _ = x.shape
            q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, HEADS, D // HEADS).unbind(2)
            x = x + self.proj(self.attention(q, k, v, 0).reshape(b, s, D))
            h = self.ln2(x)
            if tiled:
                from zeal.sequence.ulysses_sp import TiledMLP

                return x + TiledMLP.apply(lambda m, t: m(t), self.mlp, h, max(1, s // TILE), None)
            return x + self.mlp(h)

    class GPT(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.tok, self.blocks = torch.nn.Embedding(V, D), torch.nn.ModuleList([Block() for _ in range(LAYERS)])
            self.head = torch.nn.Linear(D, V)

        def hidden(self, tokens):
            x = self.tok(tokens)
            for blk in self.blocks:
                x = blk(x)
            return x

    def local_attention(q, k, v, *args):
        # [b, s, h, d] -> SDPA on [b, h, s, d], causal over the whole sequence
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return out.transpose(1, 2)

    return GPT(), local_attention


def rank_main(impl, seq, steps):
    import torch
    import torch.nn.functional as F

    impl, _, variant = impl.partition("-")
    rank = int(os.environ["OMPI_COMM_WORLD_RANK"])
    world = int(os.environ["OMPI_COMM_WORLD_SIZE"])
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    s_l = seq // world
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, V, (1, seq), generator=g)
    labels = torch.roll(tokens, -1, dims=1)
    labels[:, -1] = -100
    mine = slice(rank * s_l, (rank + 1) * s_l)
    if impl == "zeal":
        import zeal
        import zeal.mesh
        from zeal.sequence.cross_entropy import sequence_mean, sequence_parallel_cross_entropy
        from zeal.sequence.layer import DistributedAttention
        from zeal.sequence.ulysses_sp import TiledFusedLogitsLoss

        group = zeal.mesh.build(sequence=world).group("sequence") if world > 1 else None
        base = rss_bytes()
        holder = {}

        def factory():
            if group is None:
                return lambda q, k, v, _: holder["local"](q, k, v)
            return DistributedAttention(lambda q, k, v: holder["local"](q, k, v), group)

        model, holder["local"] = build(factory, variant == "tiled")

        def loss_of(hidden, y):
            if variant == "tiled":
                def ce(head, x, t):
                    return F.cross_entropy(head(x), t, ignore_index=-100, reduction="sum")

                local = TiledFusedLogitsLoss.apply(ce, model.head, hidden, y, None, max(1, s_l // TILE), None, "sum")
                count = (y != -100).sum()
                return sequence_mean(local, count, group) if group is not None else local / count
            logits = model.head(hidden)
            if group is None:
                return F.cross_entropy(logits.reshape(-1, V), y.reshape(-1), ignore_index=-100)
            return sequence_parallel_cross_entropy(logits, y, group)

        def sync():
            zeal.world().barrier().wait()
    else:
        import deepspeed
        import torch.distributed as dist
        from deepspeed.sequence.cross_entropy import vocab_sequence_parallel_cross_entropy
        from deepspeed.sequence.layer import DistributedAttention

        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["BENCH_PORT"])
        deepspeed.init_distributed("gloo", verbose=False)
        group = dist.new_group(list(range(world)))
        base = rss_bytes()
        holder = {}
        model, holder["local"] = build(lambda: DistributedAttention(lambda q, k, v, *a: holder["local"](q, k, v),
                                                                    group), False)

        def loss_of(hidden, y):
            per_token = vocab_sequence_parallel_cross_entropy(model.head(hidden).transpose(0, 1).contiguous(),
                                                              y.t().contiguous(), group)
            counted = labels.t() != -100
            return (per_token * counted).sum() / counted.sum()

        def sync():
            dist.barrier()

    def step():
        loss = loss_of(model.hidden(tokens[:, mine]), labels[:, mine])
        loss.backward()
        model.zero_grad(set_to_none=True)

    times = time_steps(step, [()], steps, sync, warmup=1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sent = getattr(model.blocks[0].attention, "all_to_all_bytes", None)
    print(json.dumps({"impl": impl + ("-" + variant if variant else ""), "seq": seq, "rank": rank, "times_s": times,
                      "peak_growth": peak - base, "a2a_bytes_per_layer": sent}), flush=True)
    if impl == "deepspeed":
        import torch.distributed as dist

        dist.destroy_process_group()


_port = [29900]


def run(impl, ranks, seq, steps, shape):
    _port[0] += 1
    os.environ["BENCH_PORT"] = str(_port[0])
    print(f"long_seq: {impl} degree {ranks} sequence {seq} ...", flush=True)
    out = mpirun(ranks, sys.executable, __file__, "--rank_impl", impl, "--rank_seq", seq, "--steps", steps,
                 "--shape", shape, timeout=1800)
    records = [json.loads(m) for m in re.findall(r'\{"impl"[^{}]*\}', out)]
    assert len(records) == ranks, out
    return {"step_s": statistics.median(next(r["times_s"] for r in records if r["rank"] == 0)),
            "peak_mib": max(r["peak_growth"] for r in records) / 2**20,
            "a2a_bytes_per_layer": records[0]["a2a_bytes_per_layer"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cap_mib", type=int, default=512)
    ap.add_argument("--max_seq", type=int, default=32768)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--degrees", default="1,2,4")
    ap.add_argument("--out", default="out/bench/long_seq.json")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="demo")
    ap.add_argument("--rank_impl")
    ap.add_argument("--rank_seq", type=int)
    args = ap.parse_args()
    set_shape(args.shape)
    if args.rank_impl:
        return rank_main(args.rank_impl, args.rank_seq, args.steps)
    os.environ["DS_ACCELERATOR"] = "cpu"
    degrees = [int(x) for x in args.degrees.split(",")]

    longest, rows = {}, []
    for tiled in ("", "-tiled"):
        for p in degrees:
            best, seq = None, 2048
            while seq <= args.max_seq:
                r = run("zeal" + tiled, p, seq, 1, args.shape)
                if r["peak_mib"] > args.cap_mib:
                    break
                best, seq = (seq, r), seq * 2
            key = f"zeal{tiled}/degree{p}"
            longest[key] = None if best is None else {"seq": best[0], **best[1]}
            if best:
                s, r = best
                rows.append([p, "on" if tiled else "off", s, f"{r['peak_mib']:.0f}", f"{r['step_s'] * 1e3:.0f}",
                             f"{s / r['step_s']:,.0f}"])
            else:
                rows.append([p, "on" if tiled else "off", "< 2048", "-", "-", "-"])
    print_table(f"Longest sequence within {args.cap_mib} MiB peak RSS growth per rank (GPT {LAYERS} x {D}, "
                f"{HEADS} heads, vocab {V}; sequence doubled from 2048; {os.cpu_count()} CPUs, ranks oversubscribed "
                "above that)", ["degree", "tiling", "longest seq", "peak MiB", "step ms", "tokens/s"], rows)

    impls = ["zeal", "deepspeed"]
    if importlib.util.find_spec("deepspeed") is None:
        print("DeepSpeed is not installed (scripts/install-bench-deps): its rows are skipped")
        impls = ["zeal"]
    compare, rows = {}, []
    for p in [d for d in degrees if d > 1]:
        results = {impl: run(impl, p, args.seq, args.steps, args.shape) for impl in impls}
        elements = 4 * (args.seq // p) * D * (p - 1) / p
        for impl, r in results.items():
            compare[f"{impl}/degree{p}"] = r
            ratio = results["zeal"]["step_s"] / r["step_s"]
            sent = r["a2a_bytes_per_layer"]
            rows.append([p, impl, f"{r['step_s'] * 1e3:.0f}", f"{ratio:.2f}", f"{r['peak_mib']:.0f}",
                         "-" if sent is None else f"{sent:,}", f"{elements * 4:,.0f}"])
    print_table(f"Sequence {args.seq}, one step (forward + loss + backward), median of {args.steps}",
                ["degree", "impl", "step ms", "zeal time / this", "peak MiB", "a2a bytes/layer fwd",
                 "4(N/P)h(P-1)/P x 4 B"], rows)
    write_json(args.out, {"benchmark": "long_seq", "cap_mib": args.cap_mib, "shape": args.shape,
                          "model": {"vocab": V, "hidden": D,
                          "heads": HEADS, "layers": LAYERS}, "longest": longest, "seq": args.seq, "compare": compare})


if __name__ == "__main__":
    main()
