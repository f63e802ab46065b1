"""A tiny Llama and a character tokenizer built locally, saved where `from_pretrained` can load them.

The examples use it by default so that they run offline in seconds; `--model NAME` takes a Hub model instead.
"""
import os
import tempfile

import torch

CHARS = list("0123456789>abcdefghijklmnopqrstuvwxyz ")


def char_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")


def save_tiny_llama(path=None, *, hidden=64, layers=2, seed=0):
    """Write a freshly initialized tiny Llama and its tokenizer to `path` (a temporary folder by default)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = path or tempfile.mkdtemp(prefix="tiny_llama_")
    tok = char_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    torch.manual_seed(seed)
    os.makedirs(path, exist_ok=True)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path
