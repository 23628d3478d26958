"""Tiny random-weight models of each supported family, for offline tests and examples.

Freshly initialised tiny models tend to repeat one token forever and are never confident; the
builders widen the initial weights (T5: ``spread`` multiplies every non-norm weight; decoder-only:
a large ``initializer_range`` and random attention biases) so that greedy outputs vary from token to
token and exit layers differ across thresholds. Weights do not matter for exactness checks against the
library's own ``generate``.
"""
from __future__ import annotations

import torch

__all__ = ["tiny_t5", "tiny_causal_lm", "tiny_llama", "tiny_qwen2", "tiny_mistral"]


def _spread_weights(model: torch.nn.Module, spread: float) -> None:
    if spread == 1.0:
        return
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" not in name:
                parameter.mul_(spread)


def _finish(model: torch.nn.Module, seed: int, spread: float, dtype: torch.dtype) -> torch.nn.Module:
    _spread_weights(model, spread)
    return model.to(dtype).eval()


def tiny_t5(
    *,
    seed: int = 0,
    vocab_size: int = 96,
    d_model: int = 32,
    d_kv: int = 8,
    d_ff: int = 64,
    num_layers: int = 3,
    num_decoder_layers: int | None = None,
    num_heads: int = 4,
    feed_forward_proj: str = "relu",
    tied: bool = True,
    spread: float = 4.0,
    dtype: torch.dtype = torch.float32,
):
    """A random ``T5ForConditionalGeneration`` (pad 0 = decoder start, EOS 1).

    tied=False gives a T5 v1.1-style model: no d_model^-0.5 rescale and an LM head with its own weights.
    """
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_kv,
        d_ff=d_ff,
        num_layers=num_layers,
        num_decoder_layers=num_decoder_layers,
        num_heads=num_heads,
        feed_forward_proj=feed_forward_proj,
        tie_word_embeddings=tied,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        dropout_rate=0.0,
    )
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(config)
    if not tied:
        # transformers 5 always ties T5's lm_head to the shared embedding; give it weights of its own
        model.lm_head.weight = torch.nn.Parameter(torch.randn(vocab_size, d_model) * d_model**-0.5)
    return _finish(model, seed, spread, dtype)


# family -> (config class, model class) of transformers
_CAUSAL_LM_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
}


def tiny_causal_lm(
    family: str,
    *,
    seed: int = 0,
    vocab_size: int = 128,
    hidden_size: int = 32,
    num_layers: int = 3,
    num_heads: int = 4,
    num_key_value_heads: int = 2,
    tied: bool = False,
    initializer_range: float = 0.4,
    dtype: torch.dtype = torch.float32,
    **extra_config,
):
    """A random decoder-only model of ``family`` (llama, qwen2, mistral): BOS 1, EOS 2, pad 0, an MLP twice
    the hidden size, grouped-query attention by default; ``extra_config`` goes to the config (e.g.
    ``sliding_window``). Biases (Qwen2's q/k/v) get random values so that they matter."""
    import transformers

    if family not in _CAUSAL_LM_CLASSES:
        raise ValueError(f"unknown family {family!r}; expected one of {sorted(_CAUSAL_LM_CLASSES)}")
    config_name, model_name = _CAUSAL_LM_CLASSES[family]
    config = getattr(transformers, config_name)(
        initializer_range=initializer_range,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **extra_config,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    with torch.no_grad():  # biases start at zero; make them matter
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.normal_(0.0, 0.5 * config.initializer_range)
    return model.to(dtype).eval()


def tiny_llama(**kwargs):
    """A random ``LlamaForCausalLM``; arguments of :func:`tiny_causal_lm` (untied by default)."""
    return tiny_causal_lm("llama", **kwargs)


def tiny_qwen2(*, tied: bool = True, **kwargs):
    """A random ``Qwen2ForCausalLM`` (q/k/v projections with biases; tied by default)."""
    return tiny_causal_lm("qwen2", tied=tied, **kwargs)


def tiny_mistral(*, sliding_window: int | None = None, **kwargs):
    """A random ``MistralForCausalLM``, optionally with a sliding attention window."""
    return tiny_causal_lm("mistral", sliding_window=sliding_window, **kwargs)


def tiny_word_tokenizer(vocab_size: int, *, pad_id: int = 0, bos_id: int | None = None, eos_id: int = 1,
                        add_bos: bool = False, add_eos: bool = False):
    """A whitespace word-level ``PreTrainedTokenizerFast`` over words ``w{i}`` for every id that is not
    special (``<pad>``, ``<s>``, ``</s>``); unknown words map to the last id. Built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = {pad_id: "<pad>", eos_id: "</s>"}
    if bos_id is not None:
        specials[bos_id] = "<s>"
    vocab = {specials.get(i, f"w{i}"): i for i in range(vocab_size)}
    unknown = f"w{vocab_size - 1}"
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unknown))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    single = " ".join((["<s>"] if add_bos else []) + ["$A"] + (["</s>"] if add_eos else []))
    added = {"<s>"} if add_bos else set()
    added |= {"</s>"} if add_eos else set()
    special_tokens = [(name, i) for i, name in specials.items() if name in added]
    tokenizer.post_processor = processors.TemplateProcessing(single=single, special_tokens=special_tokens)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        bos_token="<s>" if bos_id is not None else None,
        unk_token=unknown,
    )
