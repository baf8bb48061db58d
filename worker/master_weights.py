"""The weights a job trains, as the optimizer sees them.

On CPU in bf16, an adapter kept in fp32 over a bf16 base makes peft cast every adapter input to fp32 and every
output back, in the forward and the backward pass: about a tenth of a LoRA step on smollm2 went to those
copies, and the adapter's matmuls ran on the slow fp32 kernels. So there the model holds bf16 copies of the
trained weights and computes with them, while fp32 master copies take the optimizer's updates (a bf16 weight
would round away most small updates). Everywhere else the master weights are the model's own parameters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


class TrainedWeights:
    def __init__(self, params: list, compute_dtype: Any = None):
        """`params`: the model's trained parameters, in fp32. With a `compute_dtype`, the model's copies are
        converted to it and fp32 masters are made from their current values."""
        import torch

        self.params = params
        self.split = compute_dtype is not None and compute_dtype != torch.float32
        if not self.split:
            self.master = params
            return
        self.master = [torch.nn.Parameter(p.detach().float().clone()) for p in params]
        for p in params:
            p.data = p.data.to(compute_dtype)

    def grads_to_master(self) -> None:
        """Move the gradients of the backward pass onto the masters (fp32), for clipping and the optimizer."""
        if not self.split:
            return
        for p, m in zip(self.params, self.master, strict=True):
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None

    def master_to_model(self) -> None:
        """After an optimizer step: the model computes with the updated values."""
        if not self.split:
            return
        import torch

        with torch.no_grad():
            for p, m in zip(self.params, self.master, strict=True):
                p.copy_(m)

    @contextlib.contextmanager
    def full_precision(self) -> Iterator[None]:
        """The model's parameters are the fp32 masters meanwhile: what is saved then has full precision."""
        if not self.split:
            yield
            return
        compute = [p.data for p in self.params]
        try:
            for p, m in zip(self.params, self.master, strict=True):
                p.data = m.data
            yield
        finally:
            for p, data in zip(self.params, compute, strict=True):
                p.data = data
