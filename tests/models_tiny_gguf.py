"""Write a tiny Llama GGUF file (a few hundred KB) for tests of the GGUF loading path.

The file follows llama.cpp's layout (``general.architecture = llama``, ``blk.N.*`` tensor names,
a byte-level BPE tokenizer in ``tokenizer.ggml.*`` metadata and a chat template), so transformers
loads it exactly as it loads the real SmolLM2 GGUF. The weights are random; the large matrices are
stored as Q8_0 so that loading exercises dequantisation.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)

HIDDEN = 64
INTERMEDIATE = 128
LAYERS = 2
HEADS = 4
KV_HEADS = 2


def _byte_level_alphabet() -> list[str]:
    # GPT-2's printable spelling of the 256 byte values (the same table transformers uses).
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return [bytes_to_unicode()[b] for b in range(256)]


def write_tiny_llama_gguf(path: str | Path, *, seed: int = 0, name: str = "tiny-llama") -> Path:
    """Write a 2-layer Llama GGUF with random weights to ``path`` and return the path."""
    import gguf

    path = Path(path)
    rng = np.random.default_rng(seed)
    alphabet = _byte_level_alphabet()
    space = alphabet[ord(" ")]
    merges = [f"{space} t", "h e", f"{space}t he", "i n", f"{space} a"]
    merged = [m.replace(" ", "") for m in merges]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + alphabet + merged
    token_types = [3] * len(specials) + [1] * (len(tokens) - len(specials))
    vocab = len(tokens)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_chat_template(CHAT_TEMPLATE)

    def matrix(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)

    def add_q8(name_: str, data: np.ndarray) -> None:
        q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name_, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    head_dim = HIDDEN // HEADS
    add_q8("token_embd.weight", matrix(vocab, HIDDEN))
    for layer in range(LAYERS):
        prefix = f"blk.{layer}"
        writer.add_tensor(f"{prefix}.attn_norm.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
        add_q8(f"{prefix}.attn_q.weight", matrix(HIDDEN, HIDDEN))
        add_q8(f"{prefix}.attn_k.weight", matrix(KV_HEADS * head_dim, HIDDEN))
        add_q8(f"{prefix}.attn_v.weight", matrix(KV_HEADS * head_dim, HIDDEN))
        add_q8(f"{prefix}.attn_output.weight", matrix(HIDDEN, HIDDEN))
        writer.add_tensor(f"{prefix}.ffn_norm.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
        add_q8(f"{prefix}.ffn_gate.weight", matrix(INTERMEDIATE, HIDDEN))
        add_q8(f"{prefix}.ffn_up.weight", matrix(INTERMEDIATE, HIDDEN))
        add_q8(f"{prefix}.ffn_down.weight", matrix(HIDDEN, INTERMEDIATE))
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    # No output.weight: the head is tied to the embeddings, as in SmolLM2.

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def save_tiny_llama_folder(folder: str | Path, tokenizer, *, seed: int = 0, model_type: str = "llama") -> Path:
    """Save a random 2-layer causal LM (Llama by default) and ``tokenizer`` as a transformers folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=256,
    )
    model = AutoModelForCausalLM.from_config(config)
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_entry_after_barrier(gguf_path, cache_dir, barrier, results) -> None:
    """Child-process body for the concurrent-build test: import, wait for the sibling, build."""
    import transformers  # noqa: F401  (imported before the barrier so both builds start together)

    from ltt_exit.models.gguf_cache import ensure_gguf_cache

    barrier.wait()
    entry = ensure_gguf_cache(gguf_path, cache_dir=cache_dir)
    results.put((str(entry.path), entry.built_now))
