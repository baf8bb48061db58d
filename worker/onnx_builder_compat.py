"""The onnxruntime-genai model builder, run with the configs of transformers 5 made readable to it.

    python -m worker.onnx_builder_compat ARGS  (the same arguments as python -m onnxruntime_genai.models.builder)

transformers 5 keeps the RoPE parameters of models with two kinds of attention layer per layer type
(Gemma 3: `rope_parameters = {"full_attention": {...}, "sliding_attention": {...}}`), where the builder 0.18
expects transformers 4's flat `rope_parameters` (with `rope_type`) and `rope_local_base_freq` for the sliding
layers: it fails with KeyError 'rope_type'. The builder's models take the config as loaded, then load the
weights on their own (with their own config), so the config the builder reads is rewritten here before its
Model class sees it, and nothing else changes.
"""

from __future__ import annotations

import runpy
import sys

LAYER_TYPE_KEYS = ("full_attention", "sliding_attention")


def readable_config(config):
    """The config with per-layer-type RoPE parameters flattened the way the builder reads them (in place)."""
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and "rope_type" not in rope and set(rope) & set(LAYER_TYPE_KEYS):
        full = rope.get("full_attention") or rope.get("sliding_attention")
        if "sliding_attention" in rope:
            config.rope_local_base_freq = rope["sliding_attention"]["rope_theta"]
        config.rope_parameters = dict(full)
    return config


def _patch_builder() -> None:
    import onnxruntime_genai.models  # noqa: F401  (puts its directory on sys.path, as the builder expects)

    # builder.py imports its model classes as the top-level package `builders`, not through onnxruntime_genai.
    from builders import base

    original = base.Model.__init__

    def init(self, config, *args, **kwargs):
        original(self, readable_config(config), *args, **kwargs)

    base.Model.__init__ = init


if __name__ == "__main__":
    _patch_builder()
    sys.argv[0] = "onnxruntime_genai.models.builder"
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)
