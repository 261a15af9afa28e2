"""A plain Accelerate training loop, as its users write them and not changed for Zeal: a tiny
GPT-2 from a config, random tokens, torch AdamW with a linear schedule. DeepSpeed comes either
from `--deepspeed CONFIG` (Accelerator(deepspeed_plugin=DeepSpeedPlugin(...))) or from
`accelerate launch --config_file` with `distributed_type: DEEPSPEED`. Rank 0 writes the losses to --out.
"""
import argparse
import json
import sys
import os

import torch
from accelerate import Accelerator, DeepSpeedPlugin
from accelerate.utils import set_seed
from transformers import GPT2Config, GPT2LMHeadModel, get_linear_schedule_with_warmup


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--deepspeed", default=None)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--gas", type=int, default=2)
    args = parser.parse_args()
    plugin = DeepSpeedPlugin(hf_ds_config=args.deepspeed) if args.deepspeed else None
    accelerator = Accelerator(gradient_accumulation_steps=args.gas, deepspeed_plugin=plugin)
    set_seed(11)
    config = GPT2Config(vocab_size=96, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, config.vocab_size, (64, 16), generator=g)
    data = [{"input_ids": x, "labels": x} for x in ids]
    loader = torch.utils.data.DataLoader(data, batch_size=2, shuffle=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=1, num_training_steps=args.steps)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    losses, updates = [], 0
    model.train()
    for batch in loader:
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        losses.append(accelerator.gather(loss.detach()).mean().item())
        if accelerator.sync_gradients:
            updates += 1
            if updates == args.steps:
                break
    if accelerator.is_main_process:
        with open(args.out, "w") as f:
            json.dump({"losses": losses, "updates": updates}, f)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if accelerator.state.deepspeed_plugin is not None:
        return
    # The DDP reference leaves without the interpreter's teardown: under DDP over gloo torch can
    # deadlock there: freeing the DDP Reducer (GIL held) drops the last reference to the gloo process
    # group, whose destructor joins its worker thread, while that thread is freeing a finished
    # all-gather's tensors and waits for the GIL (seen with gdb in a hung reference, torch 2.13).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
