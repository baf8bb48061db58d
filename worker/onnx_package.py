"""Multi-adapter packages: LoRA weights as graph inputs, and one `.onnx_adapter` file per adapter.

The builder, given one adapter, writes its LoRA weights as initializers named
`model.layers.{i}.{attn|mlp}.{module}.lora_{A|B}.MatMul.weight`, A as [in, r] and B as [r, out] with the
alpha/r scaling folded into B. `make_lora_inputs` lists each of them as a graph input too and sets the
initializer to zeros: the zeros are the default a session uses when no adapter is active (the base model's
output), and an adapter loaded with `og.Adapters` overrides them. `write_onnx_adapter` computes the same
tensors from any peft adapter of the same rank and modules and stores them with
`onnxruntime.AdapterFormat`.

A fused projection (Phi-3's `qkv_proj`, `gate_up_proj`) is unpacked by the builder into one LoRA pair per
projection: each part gets the fused lora_A and its own consecutive rows of lora_B. `adapter_tensors` splits a
peft adapter's fused weights the same way, the rows sized by the base model's inputs.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jobs.export_spec import FUSED_LORA_MODULES

_PEFT_KEY = re.compile(r"layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


class PackageError(Exception):
    """The built model or an adapter does not have the LoRA layout a package needs."""


@dataclass(frozen=True)
class LoraInput:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype


def onnx_names(peft_key: str) -> list[str]:
    """The builder's initializer names for a peft LoRA weight key: one, or one per part of a fused projection."""
    match = _PEFT_KEY.search(peft_key)
    if match is None:
        raise PackageError(f"unexpected LoRA weight {peft_key!r}")
    layer, block, module, half = match.groups()
    sub = "attn" if block == "self_attn" else "mlp"
    parts = FUSED_LORA_MODULES.get(module, (module,))
    return [f"model.layers.{layer}.{sub}.{part}.lora_{half}.MatMul.weight" for part in parts]


def _split_fused(key: str, names: list[str], value: np.ndarray, inputs: dict[str, LoraInput]) -> list[np.ndarray]:
    """A fused weight's share for each part: lora_A ([r, in]) whole for each, lora_B ([out, r]) cut into rows."""
    if len(names) == 1 or ".lora_A." in names[0]:
        return [value] * len(names)
    missing = [n for n in names if n not in inputs]
    if missing:
        raise PackageError(f"adapter weight {key} has no matching input {missing[0]} in the base model")
    sizes = [inputs[n].shape[-1] for n in names]  # B inputs are [r, out]
    if sum(sizes) != value.shape[0]:
        raise PackageError(f"adapter weight {key} has {value.shape[0]} rows, the base model's parts {sizes}")
    return np.split(value, np.cumsum(sizes)[:-1], axis=0)


def _is_lora(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def lora_initializers(model_path: Path) -> dict[str, LoraInput]:
    """LoRA weights left as float initializers by the builder; fails on quantized (renamed) ones."""
    import onnx
    from onnx import helper

    model = onnx.load(str(model_path), load_external_data=False)
    found = {}
    for init in model.graph.initializer:
        if not _is_lora(init.name):
            continue
        if not init.name.endswith(".MatMul.weight"):
            raise PackageError(f"LoRA weight {init.name} was quantized or renamed by the builder")
        found[init.name] = LoraInput(
            init.name, tuple(init.dims), np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type))
        )
    return found


def make_lora_inputs(model_dir: Path, filename: str = "model.onnx") -> dict[str, LoraInput]:
    """Turn the LoRA initializers of a built model into graph inputs with zero defaults, in place."""
    import onnx
    from onnx import helper, numpy_helper

    path = model_dir / filename
    data_name = f"{filename}.data"
    model = onnx.load(str(path), load_external_data=True)
    inputs: dict[str, LoraInput] = {}
    existing = {i.name for i in model.graph.input}
    for init in model.graph.initializer:
        if not _is_lora(init.name):
            continue
        if not init.name.endswith(".MatMul.weight"):
            raise PackageError(f"LoRA weight {init.name} was quantized or renamed by the builder")
        array = numpy_helper.to_array(init)
        if init.name not in existing:
            model.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(array.shape)))
        init.CopyFrom(numpy_helper.from_array(np.zeros_like(array), init.name))
        inputs[init.name] = LoraInput(init.name, tuple(array.shape), array.dtype)
    if not inputs:
        raise PackageError("the built model has no LoRA weights to turn into inputs")
    # onnx appends to an existing external data file: write a fresh one.
    (model_dir / data_name).unlink(missing_ok=True)
    onnx.save(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data_name,
        size_threshold=0,
    )
    return inputs


def adapter_tensors(adapter_dir: Path, inputs: dict[str, LoraInput]) -> dict[str, np.ndarray]:
    """A peft adapter's weights as the builder lays them out, checked against the base model's inputs."""
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    rank = int(config["r"])
    scaling = float(config.get("lora_alpha", rank)) / (rank**0.5 if config.get("use_rslora") else rank)
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    tensors: dict[str, np.ndarray] = {}
    for key, value in weights.items():
        if "lora_" not in key:
            continue
        names = onnx_names(key)
        value = value.float().numpy() * (scaling if ".lora_B." in key else 1.0)
        for name, part in zip(names, _split_fused(key, names, value, inputs), strict=True):
            if name not in inputs:
                raise PackageError(f"adapter weight {key} has no matching input {name} in the base model")
            array = np.ascontiguousarray(part.T.astype(inputs[name].dtype))
            if array.shape != inputs[name].shape:
                raise PackageError(
                    f"adapter weight {name} has shape {array.shape}, the base model input {inputs[name].shape}"
                )
            tensors[name] = array
    missing = sorted(set(inputs) - set(tensors))
    if missing:
        raise PackageError(f"the adapter fills {len(tensors)} of {len(inputs)} LoRA inputs; missing {missing[0]}")
    return tensors


def _ort_value(array: np.ndarray):
    import onnxruntime as ort
    from onnx import TensorProto

    if array.dtype.name == "bfloat16":  # numpy has no bfloat16 of its own: pass the bits with their type
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array.view(np.uint16), TensorProto.BFLOAT16)
    return ort.OrtValue.ortvalue_from_numpy(array)


def write_onnx_adapter(adapter_dir: Path, inputs: dict[str, LoraInput], destination: Path) -> list[str]:
    """Write `destination` (.onnx_adapter); return the input names it fills."""
    import onnxruntime as ort

    tensors = adapter_tensors(adapter_dir, inputs)
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    adapter.set_parameters({name: _ort_value(array) for name, array in tensors.items()})
    destination.parent.mkdir(parents=True, exist_ok=True)
    adapter.export_adapter(str(destination))
    return sorted(tensors)
