"""Tiny random models of every supported family, built from configs (no hub), with a
word-level tokenizer covering the built-in tasks. Used by the tests and by the benchmark's
tiny-model rows."""

from __future__ import annotations

import torch

from .models import LoadedModel, wrap
from .tasks import task_vocabulary

FAMILIES = ("gpt_neox", "gpt2", "llama", "gemma2", "gemma3")


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<bos>"]
    vocab = {w: i for i, w in enumerate(specials + task_vocabulary())}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<bos>", eos_token="<bos>")


def tiny_config(family: str, vocab_size: int, n_layers: int = 2, d_model: int = 32, head_dim: int | None = None):
    """A small config of ``family``; ``head_dim`` (Gemma 2/3, Llama: 4 query heads) makes
    hook_z (n_heads * head_dim) wider or narrower than ``d_model``, as in the real Gemma 2."""
    import transformers as tf

    common = dict(vocab_size=vocab_size, max_position_embeddings=64)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=4,
                                intermediate_size=2 * d_model, rotary_pct=0.25, use_parallel_residual=True,
                                **common)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=vocab_size, n_embd=d_model, n_layer=n_layers, n_head=4, n_positions=64,
                             bos_token_id=2, eos_token_id=2)
    if family == "llama":
        return tf.LlamaConfig(hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
                              num_attention_heads=4, num_key_value_heads=2,
                              **({"head_dim": head_dim} if head_dim else {}), **common)
    if family == "gemma2":
        return tf.Gemma2Config(hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim or 8,
                               query_pre_attn_scalar=8, sliding_window=16, **common)
    if family == "gemma3":
        return tf.Gemma3TextConfig(hidden_size=d_model, intermediate_size=2 * d_model,
                                   num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=1,
                                   head_dim=head_dim or 8, query_pre_attn_scalar=8, sliding_window=16, **common)
    raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")


def tiny_model(family: str = "gemma3", n_layers: int = 2, d_model: int = 32, seed: int = 0,
               scale: float = 0.15, head_dim: int | None = None) -> LoadedModel:
    """A random model of ``family`` whose weights are scaled up so it has non-trivial outputs."""
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    config = tiny_config(family, len(tok), n_layers, d_model, head_dim)
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return wrap(hf, tok, spec=f"tiny-{family}")


def random_saelens_set(model: LoadedModel, folder, width: int = 48, seed: int = 0, sites=None,
                       attn_z: bool = False) -> None:
    """Write a random sae-lens dictionary (``cfg.json`` + ``sae_weights.safetensors``) for each
    site into ``folder/<site>/``: the same on-disk format as real sae-lens SAEs. With ``attn_z``
    the attention sites' SAEs read hook_z (width n_heads * head_dim, ``hook_name``
    ``blocks.L.attn.hook_z`` and sae-lens's hook_z reshaping recorded, as Gemma Scope's are)."""
    from pathlib import Path

    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    gen = torch.Generator().manual_seed(seed)
    for site in model.adapter.sites():
        if sites is not None and site.name not in sites:
            continue
        z = attn_z and site.kind == "attn"
        d = model.adapter.z_width if z else model.d_model
        extra = dict(reshape_activations="hook_z", metadata=SAEMetadata(hook_name=f"blocks.{site.layer}.attn.hook_z")) \
            if z else {}
        sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=width, **extra))
        with torch.no_grad():
            sae.W_enc.copy_(torch.randn(d, width, generator=gen) / d**0.5)
            sae.W_dec.copy_(torch.randn(width, d, generator=gen) / width**0.5)
            sae.b_enc.copy_(torch.randn(width, generator=gen) * 0.1)
            sae.b_dec.copy_(torch.randn(d, generator=gen) * 0.1)
        sae.save_model(Path(folder) / site.name)


def random_ae_pt(path, d: int, width: int, seed: int = 0) -> None:
    """Write a random dictionary_learning ``ae.pt`` state dict."""
    gen = torch.Generator().manual_seed(seed)
    torch.save({"encoder.weight": torch.randn(width, d, generator=gen) / d**0.5,
                "encoder.bias": torch.randn(width, generator=gen) * 0.1,
                "decoder.weight": torch.randn(d, width, generator=gen) / width**0.5,
                "bias": torch.randn(d, generator=gen) * 0.1}, path)
