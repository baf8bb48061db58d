"""A small GGUF file written from tiny-llama-test's weights, as llama.cpp's converter lays one out (Llama's q/k rows
permuted, the SmolLM2 GGUF's tokenizer metadata): an import test dequantizes it in seconds, where the real 135M
GGUF takes minutes. Loading it back with transformers gives tiny-llama-test's logits exactly."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

from worker.prepare_models import gguf_path


def _permute(w, n_head):
    # llama.cpp interleaves the rotary halves of q and k; transformers undoes it on load.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(model_dir: Path, out: Path) -> Path:
    """tiny-llama-test (`model_dir`) as a float32 GGUF file at `out`."""
    config = json.loads((model_dir / "config.json").read_text())
    tensors = load_file(str(model_dir / "model.safetensors"))
    reader = gguf.GGUFReader(str(gguf_path()))
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_tokenizer_model(reader.fields["tokenizer.ggml.model"].contents())
    writer.add_tokenizer_pre(reader.fields["tokenizer.ggml.pre"].contents())
    writer.add_token_list(reader.fields["tokenizer.ggml.tokens"].contents())
    writer.add_token_types(reader.fields["tokenizer.ggml.token_type"].contents())
    writer.add_token_merges(reader.fields["tokenizer.ggml.merges"].contents())
    for key, add in (
        ("bos", writer.add_bos_token_id),
        ("eos", writer.add_eos_token_id),
        ("padding", writer.add_pad_token_id),
    ):
        field = reader.fields.get(f"tokenizer.ggml.{key}_token_id")
        if field is not None:
            add(field.contents())
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    parts = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for name, value in sorted(tensors.items()):
        if name in names:
            target = names[name]
        else:
            _, _, layer, rest = name.split(".", 3)
            target = f"blk.{layer}.{parts[rest.removesuffix('.weight')]}.weight"
            if rest.startswith("self_attn.q_proj"):
                value = _permute(value, heads)
            elif rest.startswith("self_attn.k_proj"):
                value = _permute(value, kv)
        writer.add_tensor(target, np.ascontiguousarray(value.astype(np.float32)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
