"""One rank on a GPU: a tiny Hugging Face Llama (built from a config, no download) with
transformers' activation checkpointing offloaded to pinned host memory
(`activation_checkpointing_enable(offload=True)`, what ALST pairs with sequence parallelism), trained
by Zeal's engine at the ZeRO stages of --stages, equals the same model trained by plain torch AdamW
without checkpointing on the same device, fp32 to 1e-5: every step's loss, the first step's
gradients, the final weights. The pinned host allocator must have handed out blocks during the
forward (the offload happened). Prints HF-OFFLOAD-OK."""
import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import check, close  # noqa: E402
import zeal  # noqa: E402

V, B, SEQ, STEPS, LR = 64, 2, 48, 4, 1e-2


def tiny_llama(device):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device)


def batch(index, device):
    g = torch.Generator().manual_seed(index)
    ids = torch.randint(0, V, (B, SEQ), generator=g)
    labels = ids.clone()
    labels[:, int(torch.randint(SEQ // 3, SEQ, (1,), generator=g)):] = -100
    return ids.to(device), labels.to(device)


def loss_of(model, ids, labels):
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stages", default="0,3")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    dev = torch.device(args.device)
    initial = tiny_llama(dev)

    ref = copy.deepcopy(initial)
    opt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=0.0)
    ref_losses = []
    for step in range(STEPS):
        opt.zero_grad()
        loss = loss_of(ref, *batch(step, dev))
        loss.backward()
        if step == 0:
            ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
        opt.step()
        ref_losses.append(loss.item())

    for stage in (int(s) for s in args.stages.split(",")):
        model = copy.deepcopy(initial)
        # a CPU-only torch has no pinned allocator: --device cpu checks the checks, checkpointing alone
        model.activation_checkpointing_enable(offload=dev.type == "cuda")
        model.train()
        cfg = {"train_micro_batch_size_per_gpu": B, "gradient_accumulation_steps": 1, "steps_per_print": 1000,
               "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.0}},
               "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
               "comms_timeout_s": 60}
        engine, *_ = zeal.initialize(model=model, config=cfg)
        for step in range(STEPS):
            before = torch.cuda.host_memory_stats().get("active_requests.allocated", 0) if dev.type == "cuda" else 0
            loss = loss_of(engine, *batch(step, dev))
            if dev.type == "cuda":
                handed = torch.cuda.host_memory_stats().get("active_requests.allocated", 0) - before
                check(handed >= 3, f"stage {stage} step {step}: the forward took {handed} pinned host blocks "
                                   "(one or more per checkpointed layer expected)")
            close(torch.tensor(loss.item()), torch.tensor(ref_losses[step]), f"stage {stage} loss {step}")
            engine.backward(loss)
            if step == 0:
                for n, p in engine.module.named_parameters():
                    g = zeal.utils.safe_get_full_grad(p)
                    close(g, ref_grads[n], f"stage {stage} first gradient of {n}")
            engine.step()
        for n, p in engine.module.named_parameters():
            close(zeal.utils.safe_get_full_fp32_param(p), dict(ref.named_parameters())[n].detach(),
                  f"stage {stage} final {n}")
        print(f"stage {stage}: {STEPS} steps equal torch without checkpointing", flush=True)
    print("HF-OFFLOAD-OK", flush=True)


if __name__ == "__main__":
    main()
