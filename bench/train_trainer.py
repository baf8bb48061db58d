"""The reference a team would write by hand: a plain transformers Trainer + peft LoRA script.

Same settings as the other runs of `make bench-train`: every row rendered by the template and followed by EOS,
cut at max_seq_len, padded per batch (DataCollatorForLanguageModeling), loss on every token, fp32, AdamW, linear
schedule. Writes the adapter to OUT and a JSON line of timings to stdout.

`--bf16` is the same script as a team would write it for a GPU: the model loaded in bfloat16 and `bf16=True`.
`--skip-steps K` adds what scripts/gpu-check compares on: the non-padding tokens of steps K+1.. over the wall
time from the end of step K to the end of the last step (measured by a callback that only reads the clock, after
a CUDA synchronize), and the peak CUDA memory allocated.

Usage: python bench/train_trainer.py MODEL_DIR TRAIN_JSONL OUT [--epochs 1 --batch-size 8 --lr 5e-4 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("train")
    parser.add_argument("out")
    parser.add_argument("--template", default="Text: {text}\nEmotion: {label}")
    parser.add_argument("--epochs", type=float, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--alpha", type=int, default=32)
    parser.add_argument("--target-modules", default="q_proj,k_proj,v_proj,o_proj")
    parser.add_argument("--bf16", action="store_true", help="load the model in bfloat16 and train with bf16=True")
    parser.add_argument("--skip-steps", type=int, default=None, help="report steady tokens/s after these steps")
    args = parser.parse_args()
    started = time.perf_counter()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    torch.manual_seed(42)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows = [json.loads(line) for line in Path(args.train).read_text().splitlines()]
    texts = [args.template.format(**row) + tokenizer.eos_token for row in rows]
    features = [tokenizer(t, truncation=True, max_length=args.max_seq_len) for t in texts]
    dataset = [{"input_ids": f["input_ids"], "attention_mask": f["attention_mask"]} for f in features]
    tokens = sum(len(f["input_ids"]) for f in features)

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16 if args.bf16 else torch.float32)
    model = get_peft_model(
        model,
        LoraConfig(
            task_type="CAUSAL_LM",
            r=args.r,
            lora_alpha=args.alpha,
            lora_dropout=0.0,
            target_modules=args.target_modules.split(","),
        ),
    )
    training_args = TrainingArguments(
        output_dir=os.path.join(args.out, "trainer"),
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=args.epochs,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        warmup_steps=0.03,  # a fraction of the steps (transformers 5)
        logging_steps=50,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        seed=42,
        disable_tqdm=True,
        bf16=args.bf16,
    )
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    batch_tokens: list[int] = []  # non-padding tokens of each batch, in the order the steps take them
    step_ends: list[float] = []

    def counting_collator(features):
        batch = collator(features)
        batch_tokens.append(int(batch["attention_mask"].sum()))
        return batch

    class StepClock(TrainerCallback):
        def on_step_end(self, *_, **__):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            step_ends.append(time.perf_counter())

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=counting_collator if args.skip_steps is not None else collator,
        callbacks=[StepClock()] if args.skip_steps is not None else None,
    )
    result = trainer.train()
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    report = {
        "seconds": time.perf_counter() - started,
        "train_seconds": result.metrics["train_runtime"],
        "tokens": tokens,
        "train_loss": result.metrics["train_loss"],
    }
    if args.skip_steps is not None:
        skip = max(1, min(args.skip_steps, len(step_ends) - 1))  # the first step carries the warm-up
        report |= {
            "steps": len(step_ends),
            "steady_steps": len(step_ends) - skip,
            "steady_tokens": sum(batch_tokens[skip : len(step_ends)]),
            "steady_seconds": step_ends[-1] - step_ends[skip - 1],
            "peak_memory_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
