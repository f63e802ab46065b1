"""A tiny Llama and a character tokenizer built locally, saved where `from_pretrained` can load them.

The examples use it by default so that they run offline in seconds; `--model NAME` takes a Hub model instead.
Run alone, it writes one to a folder, loads it back with `from_pretrained` and samples from it:

    python python/examples/tiny_local.py [PATH]
"""
import os
import sys
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


def main(path=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = save_tiny_llama(path)
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    ids = tok("reverse 123>", return_tensors="pt").input_ids
    torch.manual_seed(0)
    sample = model.generate(ids, do_sample=True, max_new_tokens=6, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
    print(f"saved a tiny Llama ({sum(p.numel() for p in model.parameters())} parameters, vocabulary "
          f"{len(tok)}) and its tokenizer to {path}")
    print(f"loaded back with from_pretrained; an untrained sample after 'reverse 123>': {tok.decode(sample)!r}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
