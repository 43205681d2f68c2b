"""SFT of a causal LM with SparseGrad and the plain Trainer, on one process or several.

    python examples/train_sft.py --train-file ../shared/data/dolly-15k/train.jsonl --max-steps 50
    torchrun --nproc_per_node=2 examples/train_sft.py --train-file ...                        # DDP
    accelerate launch --config_file examples/accelerate_ddp.yaml examples/train_sft.py ...     # DDP
    accelerate launch --config_file examples/accelerate_fsdp2.yaml examples/train_sft.py ...   # FSDP2 (GPUs)

The model (default: the packaged SmolLM2-135M-Instruct) gets SparseGrad on up_proj/down_proj of every 3rd block with
the default config (periodic selection, support ≤ 2·k, stochastic rounding for bf16 weights); the bases are
calibrated on the Trainer's first batches when training begins. SparseGradCallback runs the rotation and top-k inside
backward; under DDP it takes the adapted weights out of DDP's buckets and reduces k values per step itself, under
FSDP2 (weights sharded by rows) each rank reduces its partial products. Rank 0 saves the adapter.
"""

from __future__ import annotations

import argparse

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

import peft_sparsegrad
from peft_sparsegrad import SparseGradCallback, SparseGradConfig
from peft_sparsegrad.sft import build_sft_data, load_conversations, make_collator, subsample, to_dataset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-file", required=True)
    p.add_argument("--model", default=None, help="a causal LM path (default: the packaged SmolLM2)")
    p.add_argument("--max-train-samples", type=int, default=2000)
    p.add_argument("--max-seq-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--gradient-accumulation-steps", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--output-dir", default="out/train_sft")
    p.add_argument("--activation-checkpointing", action="store_true")
    args = p.parse_args()

    path = args.model or peft_sparsegrad.smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    blocks = list(range(0, model.config.num_hidden_layers, 3))
    model = get_peft_model(model, SparseGradConfig(task_type="CAUSAL_LM", target_modules=["up_proj", "down_proj"],
                                                   layers_to_transform=blocks, calibration_steps=8))
    model.print_trainable_parameters()
    data = build_sft_data(subsample(load_conversations(args.train_file), args.max_train_samples, 0), tokenizer,
                          args.max_seq_length)
    training = TrainingArguments(
        output_dir=args.output_dir, per_device_train_batch_size=args.batch_size, max_steps=args.max_steps,
        gradient_accumulation_steps=args.gradient_accumulation_steps, learning_rate=args.lr, max_grad_norm=1.0,
        lr_scheduler_type="linear", warmup_steps=max(1, args.max_steps // 30), logging_steps=10, save_strategy="no",
        report_to=[], use_cpu=not torch.cuda.is_available(), remove_unused_columns=False,
        gradient_checkpointing=args.activation_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if args.activation_checkpointing else None)
    trainer = Trainer(model=model, args=training, train_dataset=to_dataset(data), data_collator=make_collator(tokenizer),
                      callbacks=[SparseGradCallback()])
    trainer.train()
    if trainer.is_world_process_zero():
        trainer.save_model(args.output_dir)  # the adapter: ΔW' and the bases are the same on every rank


if __name__ == "__main__":
    main()
