"""A plain Hugging Face Trainer script, written as its users write them and not changed for Zeal:
a tiny GPT-2 built from a config (no download), random tokens, `--deepspeed ds_config.json` to
train under DeepSpeed (which `zeal-deepspeed install` makes Zeal). It writes the loss curve of
this run to --out (rank 0) so the suite can compare runs.

    torchrun --nproc_per_node 2 trainer_script.py --output_dir OUT --deepspeed ds.json --max_steps 6
    torchrun --nproc_per_node 2 trainer_script.py --output_dir OUT --use_cpu --max_steps 6   # DDP
"""
import json
import resource
import sys

import torch
from transformers import (GPT2Config, GPT2LMHeadModel, HfArgumentParser, Trainer, TrainerCallback,
                          TrainingArguments)


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n, seq, vocab, seed=1234):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class LossLog(TrainerCallback):
    def __init__(self):
        self.losses, self.grad_norms = [], []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])
            self.grad_norms.append(logs.get("grad_norm"))


def main():
    argv = sys.argv[1:]

    def take(name, default=None):
        """This script's own option (the rest is TrainingArguments'), removed from argv."""
        if f"--{name}" not in argv:
            return default
        i = argv.index(f"--{name}")
        value = argv[i + 1]
        del argv[i:i + 2]
        return value

    out, resume = take("out"), take("resume")
    init_from = take("init_from")  # a saved model to start from (from_pretrained: under ZeRO-3, inside zero.Init)
    keep = take("freeze_all_but")  # freeze every parameter whose name lacks this (after from_pretrained)
    # the benchmark (benchmarks/hf_trainer.py) asks for a larger model
    size = {key: int(take(key, default)) for key, default in (("n_embd", 32), ("n_layer", 2), ("seq", 16))}
    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(argv)
    torch.manual_seed(args.seed)
    config = GPT2Config(vocab_size=96, n_positions=size["seq"], n_embd=size["n_embd"], n_layer=size["n_layer"],
                        n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel.from_pretrained(init_from) if init_from else GPT2LMHeadModel(config)
    if keep is not None:  # adapter-style fine-tuning: the rest of the model frozen
        for name, p in model.named_parameters():
            p.requires_grad_(keep in name)
    log = LossLog()
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(64, size["seq"], config.vocab_size),
                      callbacks=[log])
    metrics = trainer.train(resume_from_checkpoint=resume).metrics
    trainer.save_model(args.output_dir + "/final")
    if trainer.is_world_process_zero() and out:
        with open(out, "w") as f:
            json.dump({"losses": log.losses, "grad_norms": log.grad_norms, "global_step": trainer.state.global_step,
                       "train_runtime": metrics["train_runtime"],
                       "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, f)


if __name__ == "__main__":
    main()
