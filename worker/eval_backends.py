"""Generation backends of the evaluation stage: PyTorch (transformers + peft) and onnxruntime-genai.

Both take the same token ids (tokenized by worker/eval_data.py with the target's Hugging Face tokenizer) and
return, per example, the completion-token scores for the loss and the generated token ids, so the two are
compared on identical inputs.

- PyTorch: loss over right-padded micro-batches, logits only at completion positions; generation batched
  with left padding (`model.generate`), longest-first order, adapters merged into the weights for speed.
- onnxruntime-genai: one example at a time; the loss from the prompt pass's logits, generation streamed
  token by token (`generate_next_token`), an adapter of a multi-adapter package made active by name.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable
from pathlib import Path

from jobs.evaluation_spec import GenerationSettings
from models.model_store import load_options
from worker.data import IGNORE_INDEX, collate
from worker.eval_metrics import TokenScores

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Padded tokens per loss micro-batch (as in training): bounds activations and the vocab-sized logits rows.
CPU_TOKEN_BUDGET = 4096
CUDA_TOKEN_BUDGET = 16384

# Called between batches (and between generated tokens); raises to stop the evaluation.
Poll = Callable[[], None]
# Called with how many examples a pass just finished.
Advance = Callable[[int], None]


def _noop(*_args) -> None:
    return None


def _eos_ids(tokenizer, extra=None) -> set[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if isinstance(extra, int):
        ids.add(extra)
    elif extra:
        ids.update(int(i) for i in extra)
    return ids


def cut_at_stop(text: str, stop: list[str]) -> str:
    """The text before the first stop string, if any."""
    for s in stop:
        at = text.find(s)
        if at >= 0:
            text = text[:at]
    return text


def _has_stop(tokenizer, ids: list[int], stop: list[str]) -> bool:
    return bool(stop) and any(s in tokenizer.decode(ids, skip_special_tokens=True) for s in stop)


def _trim(ids: list[int], eos: set[int]) -> list[int]:
    for i, token in enumerate(ids):
        if token in eos:
            return ids[:i]
    return ids


class TorchBackend:
    """A base model from the store, optionally with a peft adapter directory merged in."""

    name = "pytorch"

    def __init__(self, base_dir: Path, adapter_dir: Path | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        with contextlib.suppress(AttributeError):  # sched_getaffinity is Linux-only
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
        if torch.cuda.is_available():
            self.device = torch.device("cuda")
            self.dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        else:
            self.device, self.dtype = torch.device("cpu"), torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(str(base_dir), **load_options(base_dir.name, weights=False))
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=self.dtype, **load_options(base_dir.name))
        if adapter_dir is not None:
            from peft import PeftModel

            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=FutureWarning)
                model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
                model = model.merge_and_unload()
        self.model = model.to(self.device).eval()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.eos = _eos_ids(self.tokenizer, getattr(self.model.generation_config, "eos_token_id", None))
        self.token_budget = CUDA_TOKEN_BUDGET if self.device.type == "cuda" else CPU_TOKEN_BUDGET

    def close(self) -> None:
        del self.model

    def _batches(self, order: list[int], lengths: list[int], max_rows: int) -> list[list[int]]:
        """Consecutive runs of `order` (longest first) within max_rows and the padded-token budget."""
        batches: list[list[int]] = []
        chunk: list[int] = []
        for i in order:
            longest = lengths[chunk[0]] if chunk else lengths[i]
            if chunk and (len(chunk) >= max_rows or longest * (len(chunk) + 1) > self.token_budget):
                batches.append(chunk)
                chunk = []
            chunk.append(i)
        if chunk:
            batches.append(chunk)
        return batches

    def score(self, rows: list[dict | None], poll: Poll = _noop, advance: Advance = _noop) -> list[TokenScores | None]:
        import torch
        import torch.nn.functional as F

        results: list[TokenScores | None] = [None] * len(rows)
        present = [i for i, row in enumerate(rows) if row is not None]
        lengths = [len(row["input_ids"]) if row is not None else 0 for row in rows]
        order = sorted(present, key=lambda i: -lengths[i])
        advance(len(rows) - len(present))
        with torch.inference_mode():
            for chunk in self._batches(order, lengths, 64):
                poll()
                batch = {k: v.to(self.device) for k, v in collate([rows[i] for i in chunk], self.pad_id).items()}
                labels = batch["labels"]
                keep = torch.zeros_like(labels, dtype=torch.bool)
                keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX  # position p predicts token p + 1
                targets = labels[:, 1:][keep[:, :-1]]
                logits = self.model(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    use_cache=False,
                    logits_to_keep=keep,
                ).logits
                if logits.ndim == 3:
                    logits = logits[keep]
                logits = logits.float()
                losses = F.cross_entropy(logits, targets, reduction="none")
                correct = (logits.argmax(dim=-1) == targets).long()
                owner = keep.nonzero()[:, 0]
                n = len(chunk)
                loss_sums = torch.zeros(n, dtype=torch.float64, device=owner.device).index_add_(
                    0, owner, losses.double()
                )
                n_correct = torch.zeros(n, dtype=torch.long, device=owner.device).index_add_(0, owner, correct)
                n_tokens = keep.sum(dim=1)
                for j, i in enumerate(chunk):
                    results[i] = TokenScores(float(loss_sums[j]), int(n_tokens[j]), int(n_correct[j]))
                advance(n)
        return results

    def generate(
        self, prompts: list[list[int]], settings: GenerationSettings, poll: Poll = _noop, advance: Advance = _noop
    ) -> list[list[int]]:
        import torch
        from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

        tokenizer, stop = self.tokenizer, settings.stop

        class _Stop(StoppingCriteria):
            """Polls for a cancel (raising out of generate()); ends the rows that produced a stop string."""

            def __init__(self, width: int):
                self.width = width

            def __call__(self, input_ids, scores, **kwargs):
                poll()
                done = [_has_stop(tokenizer, row[self.width :].tolist(), stop) for row in input_ids]
                return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

        options = {
            "max_new_tokens": settings.max_new_tokens,
            "do_sample": settings.do_sample,
            "pad_token_id": self.pad_id,
            "eos_token_id": sorted(self.eos),
        }
        if settings.do_sample:
            options |= {"temperature": settings.temperature, "top_p": settings.top_p, "top_k": settings.top_k}
        else:
            options |= {"temperature": None, "top_p": None, "top_k": None}
        config = GenerationConfig(**options)
        torch.manual_seed(settings.seed)
        outputs: list[list[int]] = [[] for _ in prompts]
        lengths = [len(p) + settings.max_new_tokens for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        with torch.inference_mode():
            for chunk in self._batches(order, lengths, settings.batch_size):
                poll()
                width = max(len(prompts[i]) for i in chunk)
                input_ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
                attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for j, i in enumerate(chunk):
                    n = len(prompts[i])
                    input_ids[j, width - n :] = torch.tensor(prompts[i], dtype=torch.long)
                    attention_mask[j, width - n :] = 1
                generated = self.model.generate(
                    input_ids=input_ids.to(self.device),
                    attention_mask=attention_mask.to(self.device),
                    generation_config=config,
                    stopping_criteria=StoppingCriteriaList([_Stop(width)]),
                )
                for j, i in enumerate(chunk):
                    outputs[i] = _trim(generated[j, width:].tolist(), self.eos)
                advance(len(chunk))
        return outputs


def package_root(extracted: Path) -> Path:
    """The directory holding genai_config.json: the archive root, or its only top-level folder."""
    if (extracted / "genai_config.json").is_file():
        return extracted
    found = sorted(p.parent for p in extracted.glob("*/genai_config.json"))
    if len(found) == 1:
        return found[0]
    raise FileNotFoundError("the export package holds no genai_config.json at its root")


class OnnxBackend:
    """An ONNX package run with onnxruntime-genai, optionally with one of its adapters active."""

    name = "onnxruntime-genai"

    def __init__(self, package_dir: Path, adapter: str | None = None, adapter_file: Path | None = None):
        import onnxruntime_genai as og
        from transformers import AutoTokenizer

        self.og = og
        self.model = og.Model(str(package_dir))
        self.tokenizer = AutoTokenizer.from_pretrained(str(package_dir), local_files_only=True, trust_remote_code=False)
        self.adapter = adapter
        self.adapters = None
        if adapter is not None:
            if adapter_file is None or not adapter_file.is_file():
                raise FileNotFoundError(f"the package has no adapter file for {adapter!r}")
            self.adapters = og.Adapters(self.model)
            self.adapters.load(str(adapter_file), adapter)
        self.eos = _eos_ids(self.tokenizer, self._config_eos(package_dir))

    @staticmethod
    def _config_eos(package_dir: Path):
        import json

        with contextlib.suppress(OSError, ValueError):
            return json.loads((package_dir / "genai_config.json").read_text())["model"].get("eos_token_id")
        return None

    def close(self) -> None:
        self.adapters = None
        del self.model

    def _generator(self, max_length: int, settings: GenerationSettings | None = None):
        params = self.og.GeneratorParams(self.model)
        options: dict = {"max_length": max_length, "do_sample": False}
        if settings is not None and settings.do_sample:
            options |= {
                "do_sample": True,
                "temperature": settings.temperature,
                "top_p": settings.top_p,
                "top_k": settings.top_k,
                "random_seed": settings.seed,
            }
        params.set_search_options(**options)
        generator = self.og.Generator(self.model, params)
        if self.adapters is not None:
            generator.set_active_adapter(self.adapters, self.adapter)
        return generator

    def score(self, rows: list[dict | None], poll: Poll = _noop, advance: Advance = _noop) -> list[TokenScores | None]:
        import numpy as np

        results: list[TokenScores | None] = []
        for row in rows:
            poll()
            if row is None:
                results.append(None)
                advance(1)
                continue
            ids, labels = row["input_ids"], np.asarray(row["labels"])
            generator = self._generator(len(ids) + 1)
            generator.append_tokens(np.asarray([ids], dtype=np.int32))
            logits = np.asarray(generator.get_output("logits")).reshape(len(ids), -1)
            del generator
            positions = np.nonzero(labels[1:] != IGNORE_INDEX)[0]  # position p predicts token p + 1
            targets = labels[positions + 1]
            chosen = logits[positions].astype(np.float64)
            top = chosen.max(axis=1)
            log_norm = top + np.log(np.exp(chosen - top[:, None]).sum(axis=1))
            losses = log_norm - chosen[np.arange(len(positions)), targets]
            correct = int((chosen.argmax(axis=1) == targets).sum())
            results.append(TokenScores(float(losses.sum()), len(positions), correct))
            advance(1)
        return results

    def generate(
        self, prompts: list[list[int]], settings: GenerationSettings, poll: Poll = _noop, advance: Advance = _noop
    ) -> list[list[int]]:
        import numpy as np

        outputs: list[list[int]] = []
        for prompt in prompts:
            poll()
            generator = self._generator(len(prompt) + settings.max_new_tokens, settings)
            generator.append_tokens(np.asarray([prompt], dtype=np.int32))
            tokens: list[int] = []
            # Streamed: one token per step, stopped by EOS, max_length, or a stop request.
            while not generator.is_done() and len(tokens) < settings.max_new_tokens:
                generator.generate_next_token()
                token = int(generator.get_next_tokens()[0])
                if token in self.eos:
                    break
                tokens.append(token)
                if _has_stop(self.tokenizer, tokens, settings.stop):
                    break
                if len(tokens) % 16 == 0:
                    poll()
            del generator
            outputs.append(tokens)
            advance(1)
        return outputs
