"""One rank of a 2- or 4-rank job: a tiny Hugging Face Llama (built from a config, no download;
4 heads, 2 key/value heads) trained through ALST's pieces with Zeal equals one torch process holding
the whole sequence, fp32 to 1e-5: every step's loss, the first step's gradients, the final weights.

UlyssesSPAttentionHF.register_with_transformers wraps transformers' "sdpa" attention (at degree 4
the 2 key/value heads are repeated to split), UlyssesSPDataLoaderAdapter shards each batch (checked
shard for shard: tokens, global position ids, labels shifted before the cut), zeal.initialize takes
the returned mpu, the loss is zeal's sequence_parallel_cross_entropy. With --tiled the decoder MLPs
run as TiledMLP (3 tiles) and the logits and loss as TiledFusedLogitsLoss (3 tiles, "sum", then the
sequence mean). With --checkpoint, transformers' activation checkpointing (non-reentrant; with a
device, the checkpointed hidden states offloaded to host memory), so every layer's all-to-alls run
again in the backward's recomputation. Samples are padded to different lengths. ZeRO stages of
--stages.
Prints HF-SEQ-OK from every rank that checked everything."""
import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import check, close  # noqa: E402
import zeal  # noqa: E402
from zeal.sequence.cross_entropy import sequence_mean, sequence_parallel_cross_entropy  # noqa: E402
from zeal.sequence.ulysses_sp import (TiledFusedLogitsLoss, TiledMLP, UlyssesSPAttentionHF,  # noqa: E402
                                      UlyssesSPDataLoaderAdapter)
from zeal.utils import groups as ds_groups  # noqa: E402

LR, STEPS, B, SEQ, V = 1e-2, 4, 1, 24, 32


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def batch(data_rank, seq_rank, index):
    """What the loader of (data rank, sequence rank) gives as its index-th batch."""
    g = torch.Generator().manual_seed(1000 * data_rank + 100 * seq_rank + index)
    ids = torch.randint(0, V, (B, SEQ), generator=g)
    labels = ids.clone()
    labels[:, int(torch.randint(SEQ // 3, SEQ, (1,), generator=g)):] = -100
    return {"input_ids": ids, "position_ids": torch.arange(SEQ).expand(B, SEQ).clone(), "labels": labels}


def shifted(labels):
    return F.pad(labels, (0, 1), value=-100)[:, 1:]


def reference_run(model, data, sp):
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    losses = []
    for step in range(STEPS):
        opt.zero_grad()
        per_rank = []
        for d in range(data):
            b = batch(d, step % sp, step // sp)  # the adapter's order: each sequence rank's batch in turn
            logits = model(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits
            per_rank.append(F.cross_entropy(logits.reshape(-1, V), shifted(b["labels"]).reshape(-1)))
        (sum(per_rank) / data).backward()
        if step == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        losses.append([x.item() for x in per_rank])
    return losses, grads, {n: p.detach().clone() for n, p in model.named_parameters()}


class Tiled(torch.nn.Module):
    """The Llama with every decoder MLP as TiledMLP and the logits and loss as TiledFusedLogitsLoss:
    forward returns this rank's summed loss (the logits exist one tile at a time)."""

    def __init__(self, llama, shards):
        super().__init__()
        self.llama, self.shards = llama, shards
        for layer in llama.model.layers:
            mlp = layer.mlp
            forward = type(mlp).forward
            mlp.forward = lambda x, mlp=mlp, forward=forward: TiledMLP.apply(forward, mlp, x, shards, None)

    def forward(self, input_ids, position_ids, shift_labels):
        hidden = self.llama.model(input_ids=input_ids, position_ids=position_ids)[0]

        def ce(head, x, y):
            return F.cross_entropy(head(x), y, ignore_index=-100, reduction="sum")

        return TiledFusedLogitsLoss.apply(ce, self.llama.lm_head, hidden, shift_labels, None, self.shards, None, "sum")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sp", type=int, required=True)
    ap.add_argument("--stages", default="0,1,2,3")
    ap.add_argument("--tiled", action="store_true")
    ap.add_argument("--checkpoint", action="store_true",
                    help="transformers' activation checkpointing with its hidden states offloaded to host memory")
    args = ap.parse_args()
    world = zeal.world()
    rank, sp = world.rank, args.sp
    data_rank, seq_rank = rank // sp, rank % sp
    initial = tiny_llama()
    ref_losses, ref_grads, ref_final = reference_run(copy.deepcopy(initial), world.size // sp, sp)

    mpu = UlyssesSPAttentionHF.register_with_transformers(initial, "sdpa", sp, B)
    check(ds_groups._get_sequence_parallel_world_size() == sp, "sequence parallel world size")
    group = ds_groups._get_sequence_parallel_group()
    for stage in (int(s) for s in args.stages.split(",")):
        model = copy.deepcopy(initial)
        if args.checkpoint:  # the backward recomputes each layer: its all-to-alls run again there
            # offload to host memory needs a device (transformers pins the copies; a CPU-only torch
            # has no pinned allocator, and host activations have nowhere to go)
            model.activation_checkpointing_enable(offload=torch.cuda.is_available())
        if args.tiled:
            model = Tiled(model, 3)
        cfg = {"train_micro_batch_size_per_gpu": B, "gradient_accumulation_steps": 1, "steps_per_print": 1000,
               "sequence_parallel_size": sp, "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.0}},
               "zero_optimization": {"stage": stage, "reduce_bucket_size": 256,
                                     "stage3_param_persistence_threshold": 0}, "comms_timeout_s": 60}
        engine, *_ = zeal.initialize(model=model, config=cfg, mpu=mpu)
        check(engine._core.reduction_axes == (["data", "sequence"] if world.size > sp else ["sequence"]),
              f"reduces over {engine._core.reduction_axes}")
        loader = UlyssesSPDataLoaderAdapter([batch(data_rank, seq_rank, i) for i in range(STEPS)], seq_rank, group,
                                            sp)
        check(len(loader) == STEPS * sp, f"adapter length {len(loader)}")
        what = f"sp {sp} stage {stage}" + (" tiled" if args.tiled else "")
        chunk = SEQ // sp
        mine = slice(seq_rank * chunk, (seq_rank + 1) * chunk)
        for step in range(STEPS):
            shard = next(loader)
            whole = batch(data_rank, step % sp, step // sp)
            check(torch.equal(shard["input_ids"], whole["input_ids"][:, mine]), f"{what}: input_ids shard")
            check(torch.equal(shard["position_ids"], whole["position_ids"][:, mine]), f"{what}: global positions")
            check(torch.equal(shard["shift_labels"], shifted(whole["labels"])[:, mine]), f"{what}: shifted labels")
            if args.tiled:
                local = engine(shard["input_ids"], shard["position_ids"], shard["shift_labels"])
                loss = sequence_mean(local, (shard["shift_labels"] != -100).sum(), group)
            else:
                logits = engine(input_ids=shard["input_ids"], position_ids=shard["position_ids"]).logits
                loss = sequence_parallel_cross_entropy(logits, shard["shift_labels"], group)
            close(loss.detach(), torch.tensor(ref_losses[step][data_rank]), f"{what} step {step} loss")
            engine.backward(loss)
            if step == 0:
                for n, p in model.named_parameters():
                    n = n.removeprefix("llama.")
                    close(zeal.utils.safe_get_full_grad(p), ref_grads[n], f"{what} step 0 gradient of {n}")
            engine.step()
        for n, p in model.named_parameters():
            n = n.removeprefix("llama.")
            close(zeal.utils.safe_get_full_fp32_param(p), ref_final[n], f"{what} {n}")
    print(f"HF-SEQ-OK rank {rank}", flush=True)


if __name__ == "__main__":
    main()
