"""What a run trains with: the device, threads and precision it computes in, and the trained model around the
model of worker/model_setup.py: its fp32 master weights (worker/master_weights.py), AdamW over them, the fp16
loss scaler, gradient checkpointing when activations would not fit, and compiled decoder layers.

torch and transformers are imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.fine_tune_spec import FineTuneSpec
from models.errors import InvalidRequest
from models.model_store import load_options
from worker.master_weights import TrainedWeights
from worker.model_setup import (
    Setup,
    activation_bytes,
    available_memory,
    build_model,
    compile_decoder_layers,
    load_weights,
    pick_device,
    resolve_compile,
    save_weights,
    set_threads,
)
from worker.precision_probe import choose_precision
from worker.train_plan import TrainingPlan


@dataclass
class TrainingDevice:
    device: Any  # torch.device
    threads: int
    precision: str  # bf16 | fp16 | fp32
    precision_reason: str  # why: set by the job, or what auto measured (worker/precision_probe.py)
    config: Any  # the base model's transformers config, which the thread count was chosen for

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def pick_training_device(
    spec: FineTuneSpec, base_dir: Path, work_dir: Path | None = None, resuming: bool = False
) -> TrainingDevice:
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(base_dir), **load_options(spec.model, weights=False))
    threads = set_threads(config)
    device = pick_device()
    cuda = device.type == "cuda"
    if spec.mixed_precision == "fp16" and not cuda:
        raise InvalidRequest("mixed_precision fp16 needs a CUDA device; use bf16 or fp32.", param="mixed_precision")
    cuda_bf16 = cuda and torch.cuda.is_bf16_supported()
    precision, reason = choose_precision(spec, config, threads, cuda, cuda_bf16, work_dir, resuming)
    return TrainingDevice(device, threads, precision, reason, config)


@dataclass
class TrainedModel:
    setup: Setup
    weights: TrainedWeights
    optimizer: Any  # torch.optim.AdamW over weights.master
    scaler: Any  # torch.amp.GradScaler in fp16, else None
    gradient_checkpointing: bool
    activation_bytes: int  # estimated, of the largest micro-batch
    compiled_layers: int

    @classmethod
    def build(
        cls,
        spec: FineTuneSpec,
        base_dir: Path,
        device: TrainingDevice,
        plan: TrainingPlan,
        *,
        init_dir: Path | None,
        resume_dir: Path | None,
        compile_cache_dir: Path | None,
    ) -> TrainedModel:
        """The model initialised from the seed (and `init_dir` when continuing a job), with the weights of the
        checkpoint at `resume_dir` when resuming; the optimizer's state is loaded later
        (load_optimizer_state)."""
        import torch

        bytes_per_value = 4 if device.precision == "fp32" else 2
        activations = activation_bytes(device.config, plan.largest_micro_batch_tokens(), bytes_per_value)
        if spec.gradient_checkpointing == "auto":  # when the activations would not fit
            checkpointing = activations > 0.5 * available_memory(device.device)
        else:
            checkpointing = bool(spec.gradient_checkpointing)

        torch.manual_seed(spec.seed)
        if device.cuda:
            torch.cuda.manual_seed_all(spec.seed)
        setup = build_model(spec, base_dir, device.device, device.precision, checkpointing, init_dir)
        if resume_dir is not None:  # the weights first, in fp32, so that master weights start from them exactly
            load_weights(setup, resume_dir)
        weights = TrainedWeights([p for p in setup.model.parameters() if p.requires_grad], setup.trained_compute_dtype)
        params = weights.master
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": spec.weight_decay}]
        no_decay = [p for p in params if p.ndim < 2]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        # One fused kernel over every tensor instead of a loop of small ops (about 9 ms a step on CPU otherwise).
        fused = all(p.dtype.is_floating_point for p in params)
        optimizer = torch.optim.AdamW(groups, lr=plan.learning_rate, fused=fused)
        compiled_layers = 0
        if resolve_compile(spec, device.device, plan.total_steps, checkpointing):
            compiled_layers = compile_decoder_layers(setup.model, compile_cache_dir)
        scaler = torch.amp.GradScaler("cuda") if device.precision == "fp16" else None
        return cls(setup, weights, optimizer, scaler, checkpointing, activations, compiled_layers)

    def update(self, learning_rate: float, max_grad_norm: float) -> None:
        """The optimizer step on the gradients of the backward passes: clipped, at `learning_rate`."""
        import torch

        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate
        self.weights.grads_to_master()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.weights.master, max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.weights.master_to_model()
        if self.setup.device.type == "cuda":  # so that the step's time is measured whole
            torch.cuda.synchronize()

    def save(self, dest: Path, tokenizer=None) -> None:
        """The trained weights in full precision (the fp32 masters), as save_weights writes them."""
        with self.weights.full_precision():
            save_weights(self.setup, dest, tokenizer)

    def optimizer_state(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def load_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def dtype(self) -> str:
        return str(next(self.setup.model.parameters()).dtype).removeprefix("torch.")

    def compute_dtype(self) -> str | None:
        """The dtype the model computes its trained weights in."""
        params = self.weights.params
        return str(params[0].dtype).removeprefix("torch.") if params else None

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.weights.master)
