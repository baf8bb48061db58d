"""`make bench-dpo`: a supervised fine-tune, then DPO from its adapter, on the emotion data; Grove's DPO against
TRL's DPOTrainer on the same pairs, in the same run.

The preference set is built from emotion/train.jsonl by one rule (preference_pair below):
- prompt: one user message, PROMPT with the row's text;
- preferred: the label alone ("joy");
- non-preferred: for even rows another label (the row's label shifted by a seeded draw of 1-5 places in
  LABELS), for odd rows a rambling sentence that names another label without committing to it.

Steps (one process, the same threads for every run):
1. SFT: the first --sft-rows rows as chat examples (PROMPT, then the label), LoRA r=16 alpha=32 on q/k/v/o,
   one epoch, batch 8, lr 5e-4, with Grove's trainer (worker.train.train_adapter, what a worker runs);
2. Grove DPO from that adapter: the next --pairs rows as pairs, beta 0.1, one epoch, batch 8, lr --dpo-lr;
3. TRL 1.16 DPOTrainer from the same adapter on the same pairs, tokenized by Grove (the token ids are handed to
   it), same batch, epochs, lr, schedule, beta and precision, reference the base with the adapter off as in Grove.
   Its timing is of trainer.train() alone; Grove's includes loading the model, tokenizing and checkpointing;
4. every model scored the same way: label accuracy (greedy generation, first word = label) on the first
   --val-rows rows of val.jsonl; reward accuracy (beta x log-ratio to the base, preferred above non-preferred)
   on --heldout pairs from the end of train.jsonl and on the val.jsonl rows made pairs by the same rule.

Writes the "## DPO" section of docs/BENCHMARKS.md (unless --no-write) and var/bench/dpo/results.json.
Usage: python bench/dpo_bench.py [--model smollm2-135m-instruct] [--sft-rows 2000] [--pairs 500] [--rows N]
--rows N shrinks every set to N rows (a smoke run, e.g. --model tiny-llama-test --rows 16 --no-write).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import random
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DATA = REPO.parent / "shared" / "data" / "emotion"
OUT = REPO / "var" / "bench" / "dpo"
LABELS = ["sadness", "joy", "love", "anger", "fear", "surprise"]
PROMPT = (
    "Which emotion does this text express: sadness, joy, love, anger, fear or surprise? Answer with one word.\n\n"
    "Text: {text}"
)
RAMBLING = (
    "Well, that is hard to say. Reading it again, there might be some {other} in it, or perhaps something else "
    "entirely; it really depends on how you look at it."
)
ADAPTER = {"r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
BETA = 0.1
BATCH = 8
MAX_SEQ_LEN = 160
SECTION = "## DPO"


def read_rows(name: str) -> list[dict]:
    with (DATA / name).open() as f:
        return [json.loads(line) for line in f]


def messages(text: str) -> list[dict]:
    return [{"role": "user", "content": PROMPT.format(text=text)}]


def preference_pair(row: dict, index: int, seed: int = 0) -> dict:
    """The documented rule, in OpenAI's preference format."""
    shift = random.Random(f"{seed}-{index}").randint(1, len(LABELS) - 1)
    other = LABELS[(LABELS.index(row["label"]) + shift) % len(LABELS)]
    rejected = other if index % 2 == 0 else RAMBLING.format(other=other)
    return {
        "input": {"messages": messages(row["text"])},
        "preferred_output": [{"role": "assistant", "content": row["label"]}],
        "non_preferred_output": [{"role": "assistant", "content": rejected}],
    }


def as_example(pair: dict):
    from models.datasets import PreferenceExample

    return PreferenceExample(
        messages=pair["input"]["messages"],
        chosen=pair["preferred_output"][0]["content"],
        rejected=pair["non_preferred_output"][0]["content"],
    )


class Hooks:
    """TrainingHooks that keep the metrics rows and never stop."""

    def __init__(self):
        self.metrics: list[dict] = []
        self.stats: dict = {}

    def on_start(self, total_steps, stats):
        self.stats = stats

    def on_metrics(self, step, total_steps, metrics):
        self.metrics.append({"step": step, **metrics})

    def on_checkpoint(self, step, path, metrics, kept):
        pass

    def on_event(self, type, message, data):
        pass

    def should_stop(self):
        return False


def spec(model: str, **fields):
    from jobs.fine_tune_spec import FineTuneSpec

    return FineTuneSpec.model_validate(
        {
            "model": model,
            "training_file": "bench",
            "hyperparameters": {"n_epochs": 1, "batch_size": BATCH},
            "adapter": ADAPTER,
            "max_seq_len": MAX_SEQ_LEN,
            "log_every_steps": 25,
            "seed": 7,
            "mixed_precision": "fp32",
            "compile": False,
            **fields,
        }
    )


# --- scoring -------------------------------------------------------------------------------------------------


def load(model_dir: Path, adapter_dir: Path | None):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    return model.eval()


def label_accuracy(model, tokenizer, rows: list[dict]) -> float:
    """Greedy generation after the chat prompt; right when the answer's first word is the label."""
    import torch

    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    right = 0
    for start in range(0, len(rows), 16):
        chunk = rows[start : start + 16]
        prompts = [
            tokenizer.apply_chat_template(messages(r["text"]), tokenize=False, add_generation_prompt=True)
            for r in chunk
        ]
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=pad)
        for row, ids in zip(chunk, out[:, batch["input_ids"].shape[1] :], strict=True):
            words = re.findall(r"[a-z]+", tokenizer.decode(ids, skip_special_tokens=True).lower())
            right += bool(words) and words[0] == row["label"]
    return right / len(rows)


def reward_accuracy(model, tokenizer, pair_rows: list[dict]) -> dict:
    """DPO's validation metrics of an adapter against the base (worker/dpo_step.py, Grove's own scoring)."""
    import torch

    from worker.dpo_step import DpoTrainer
    from worker.model_setup import Setup

    setup = Setup(model, torch.device("cpu"), "fp32", None, ADAPTER["r"], True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainer = DpoTrainer(setup, pad, Hooks(), BETA)
    micro = [[[row] for row in pair_rows[s : s + 16]] for s in range(0, len(pair_rows), 16)]
    loss, metrics = trainer.evaluate(micro)
    return {"loss": round(loss, 4), **metrics}


# --- runs ----------------------------------------------------------------------------------------------------


def trl_dpo(
    model_dir: Path, sft_dir: Path, tokenizer, pair_rows: list[dict], lr: float, work: Path, precision: str
) -> dict:
    """TRL's DPOTrainer from the supervised adapter on Grove's token ids; (seconds, adapter dir)."""
    import torch
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from worker.data import IGNORE_INDEX

    def split(row: dict) -> tuple[list[int], list[int]]:
        start = next(i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX)
        return row["input_ids"][:start], row["input_ids"][start:]

    rows = []
    for row in pair_rows:
        prompt, chosen = split(row)
        _, rejected = split(row["rejected"])
        rows.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})

    class Tokenized(DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(sft_dir), is_trainable=True)
    config = DPOConfig(
        output_dir=str(work / "trl"),
        per_device_train_batch_size=BATCH,
        num_train_epochs=1,
        learning_rate=lr,
        lr_scheduler_type="linear",
        warmup_steps=int(math.ceil(len(rows) / BATCH) * 0.03),  # Grove's warmup_ratio 0.03, in steps
        beta=BETA,
        loss_type=["sigmoid"],
        max_length=None,
        gradient_checkpointing=False,
        bf16=precision == "bf16",
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=25,
        seed=7,
        disable_dropout=True,
    )
    trainer = Tokenized(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    if "ref" in model.peft_config:  # the base as the reference, as in Grove (TRL would copy the starting adapter)
        model.delete_adapter("ref")
    started = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - started
    adapter_dir = work / "trl-adapter"
    model.save_pretrained(str(adapter_dir))
    return {"seconds": seconds, "adapter_dir": adapter_dir, "train_loss": output.training_loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--sft-rows", type=int, default=2000)
    parser.add_argument("--pairs", type=int, default=500)
    parser.add_argument("--heldout", type=int, default=300)
    parser.add_argument("--val-rows", type=int, default=300)
    parser.add_argument("--dpo-lr", type=float, default=5e-5)
    parser.add_argument("--rows", type=int, help="shrink every set to this many rows (a smoke run)")
    parser.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help="of every run; auto: bf16 on a CUDA device that has it, else fp32 (bf16 on a CPU without AVX512-BF16 "
        "or AMX is emulated, several times slower)",
    )
    parser.add_argument("--sft-adapter", type=Path, help="reuse the SFT adapter of an earlier run of this script")
    parser.add_argument("--sft-seconds", type=float, help="with --sft-adapter: its training time, for the table")
    parser.add_argument("--out", type=Path, default=OUT, help="work and results directory")
    parser.add_argument("--no-trl", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.rows:
        args.sft_rows = args.pairs = args.heldout = args.val_rows = args.rows
    if args.precision == "auto":
        import torch

        args.precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"

    from transformers import AutoTokenizer

    from models.model_store import resolve_model
    from worker.data import encode_examples, finalize_pairs
    from worker.train import train_adapter

    model_dir = resolve_model(args.model).path
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    train_rows, val_rows = read_rows("train.jsonl"), read_rows("val.jsonl")[: args.val_rows]
    sft_rows = train_rows[: args.sft_rows]
    dpo_rows = train_rows[args.sft_rows : args.sft_rows + args.pairs]
    heldout_rows = train_rows[-args.heldout :]
    dpo_pairs = [as_example(preference_pair(r, args.sft_rows + i)) for i, r in enumerate(dpo_rows)]
    heldout = finalize_pairs(
        encode_examples(
            [as_example(preference_pair(r, len(train_rows) - args.heldout + i)) for i, r in enumerate(heldout_rows)],
            tokenizer,
        ),
        MAX_SEQ_LEN,
    ).rows
    val_pairs = finalize_pairs(
        encode_examples([as_example(preference_pair(r, i, seed=1)) for i, r in enumerate(val_rows)], tokenizer),
        MAX_SEQ_LEN,
    ).rows
    train_pairs = finalize_pairs(encode_examples(dpo_pairs, tokenizer), MAX_SEQ_LEN).rows

    from models.datasets import ChatExample

    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"settings": vars(args), "runs": {}}
    sft_examples = [
        ChatExample(messages=[*messages(r["text"]), {"role": "assistant", "content": r["label"]}]) for r in sft_rows
    ]
    if args.sft_adapter:
        sft_dir = args.sft_adapter
        results["runs"]["sft"] = {"seconds": args.sft_seconds, "reused": str(sft_dir)}
    else:
        sft_dir = supervised(args, model_dir, sft_examples, results)

    started = time.perf_counter()
    hooks = Hooks()
    grove = train_adapter(
        spec(args.model, learning_rate=args.dpo_lr, dpo={"beta": BETA}, mixed_precision=args.precision),
        model_dir,
        dpo_pairs,
        None,
        args.out / "grove-dpo",
        hooks,
        init_dir=sft_dir,
        resume=False,
    )
    results["runs"]["grove_dpo"] = {
        "seconds": time.perf_counter() - started,
        "train_loss": grove.train_loss,
        "steps": grove.steps,
        "first_loss": hooks.metrics[0]["train_loss"] if hooks.metrics else None,
    }
    print("grove dpo", results["runs"]["grove_dpo"], flush=True)

    adapters = {"base": None, "sft": sft_dir, "grove_dpo": grove.adapter_dir}
    if not args.no_trl:
        trl = trl_dpo(model_dir, sft_dir, tokenizer, train_pairs, args.dpo_lr, args.out, args.precision)
        results["runs"]["trl_dpo"] = {"seconds": trl["seconds"], "train_loss": trl["train_loss"]}
        adapters["trl_dpo"] = trl["adapter_dir"]
        print("trl dpo", results["runs"]["trl_dpo"], flush=True)

    scores = {}
    for name, adapter_dir in adapters.items():
        model = load(model_dir, adapter_dir)
        scores[name] = {"label_accuracy": label_accuracy(model, tokenizer, val_rows)}
        if adapter_dir is not None:
            scores[name]["heldout"] = reward_accuracy(model, tokenizer, heldout)
            scores[name]["val_pairs"] = reward_accuracy(model, tokenizer, val_pairs)
        print(name, scores[name], flush=True)
    results["scores"] = scores
    results["pairs"] = {"train": len(train_pairs), "heldout": len(heldout), "val": len(val_pairs)}
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    if not args.no_write:
        write_section(results, args)


def supervised(args, model_dir: Path, sft_examples: list, results: dict) -> Path:
    from worker.train import train_adapter

    started = time.perf_counter()
    hooks = Hooks()
    sft_spec = spec(args.model, learning_rate=5e-4, mixed_precision=args.precision)
    sft = train_adapter(sft_spec, model_dir, sft_examples, None, args.out / "sft", hooks, resume=False)
    results["runs"]["sft"] = {"seconds": time.perf_counter() - started, "train_loss": sft.train_loss}
    print("sft", results["runs"]["sft"], flush=True)
    return sft.adapter_dir


def write_section(results: dict, args) -> None:
    runs, scores = results["runs"], results["scores"]
    pairs = results["pairs"]
    n_pairs = pairs["train"]

    def seconds(value: float | None) -> str:
        return "" if value is None else f"{value:.0f} s"

    def speed(name: str) -> str:
        return f"{runs[name]['seconds']:.0f} s ({n_pairs / runs[name]['seconds']:.2f} pairs/s)" if name in runs else ""

    def reward(name: str, part: str) -> str:
        got = scores[name].get(part)
        return "" if got is None else f"{100 * got['rewards/accuracies']:.1f}% (margin {got['rewards/margins']:.2f})"

    rows = [
        ("base model", "", "base", ""),
        (f"SFT, Grove ({args.sft_rows} rows, 1 epoch)", seconds(runs["sft"]["seconds"]), "sft", ""),
        (
            "DPO from the SFT adapter, Grove",
            speed("grove_dpo"),
            "grove_dpo",
            f"first loss {runs['grove_dpo']['first_loss']}",
        ),
    ]
    if "trl_dpo" in runs:
        grove_s, trl_s = runs["grove_dpo"]["seconds"], runs["trl_dpo"]["seconds"]
        rows.append(
            (
                "DPO from the SFT adapter, TRL 1.16 DPOTrainer",
                speed("trl_dpo"),
                "trl_dpo",
                f"Grove {trl_s / grove_s:.2f}x as fast",
            )
        )
    header = (
        f"| model | training time | label accuracy, val.jsonl[:{args.val_rows}] | reward accuracy, "
        f"{pairs['heldout']} held-out pairs | reward accuracy, {pairs['val']} val pairs | notes |"
    )
    table = [
        header,
        "|---|---|---|---|---|---|",
    ]
    for title, seconds, name, note in rows:
        table.append(
            f"| {title} | {seconds} | {100 * scores[name]['label_accuracy']:.1f}% | {reward(name, 'heldout')} | "
            f"{reward(name, 'val_pairs')} | {note} |"
        )
    today = datetime.date.today().isoformat()
    text = "\n".join(
        [
            SECTION,
            "",
            f"`make bench-dpo` — {today}, {platform.machine()} CPU, no GPU, one process (bench/dpo_bench.py). "
            f"{args.model}; SFT on the first {args.sft_rows} rows of emotion/train.jsonl as chat (the prompt, then "
            f"the label), then DPO from that adapter on the next {n_pairs} rows as pairs, beta {BETA}, batch {BATCH}, "
            f"1 epoch, lr {args.dpo_lr}, LoRA r=16 alpha=32 on q/k/v/o, {args.precision}. "
            "Pairs by the rule in bench/dpo_bench.py: "
            "preferred = the label alone; non-preferred = another label (even rows) or a rambling sentence naming "
            "another label (odd rows). Reward accuracy: beta x log-ratio to the base, preferred above non-preferred "
            "(held-out pairs: the last rows of train.jsonl; val pairs: val.jsonl's rows by the same rule). Label "
            "accuracy: greedy generation, first word = label. TRL gets Grove's token ids and the same settings, "
            "with the base as reference; its time is trainer.train() alone, Grove's the whole train_adapter call "
            "(model load, tokenization, checkpoints included).",
            "",
            *table,
            "",
        ]
    )
    path = REPO / "docs" / "BENCHMARKS.md"
    doc = path.read_text()
    if SECTION + "\n" in doc:
        head, _, rest = doc.partition(SECTION + "\n")
        tail = rest[rest.find("\n## ") + 1 :] if "\n## " in rest else ""
        doc = head + text + ("\n" + tail if tail else "")
    else:
        doc = doc.rstrip("\n") + "\n\n" + text
    path.write_text(doc)


if __name__ == "__main__":
    main()
