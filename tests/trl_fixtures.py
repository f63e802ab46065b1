"""A tiny Llama and a character tokenizer, built locally (no Hub access), saved where TRL can load them."""
import os
import subprocess
import sys

import torch

CHARS = list("0123456789>abcdefgh ")


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")


def save_tiny_model(path, seed=0, tie=False, softcap=None, hidden=32):
    """Save a 2-layer Llama (d=32 unless `hidden` says otherwise, V=22) and its tokenizer under `path`; return `path`. With `softcap`, a
    Gemma 2 of the same size whose logits are soft-capped at it (final_logit_softcapping)."""
    from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig

    tok = build_tokenizer()
    size = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                pad_token_id=0, eos_token_id=1, bos_token_id=1, tie_word_embeddings=tie)
    if softcap is None:
        config = LlamaConfig(**size)
    else:
        config = Gemma2Config(**size, head_dim=8, final_logit_softcapping=softcap)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if softcap is not None:
        with torch.no_grad():  # logits large next to the cap, so that the cap matters
            model.get_output_embeddings().weight.mul_(20.0)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def perturb(model, scale=0.05, seed=1):
    """Move a model away from its reference copy, so that log-ratios to the reference are not 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(a, b, rtol=2e-4, atol=1e-6):
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def torchrun(worker, *args, nproc=2, timeout=240, **env):
    """Run tests/<worker> with `args` under torch.distributed.run on `nproc` CPU processes (offline, one
    thread each); a failure shows the end of its output, a timeout ends the workers too."""
    from gro_kernels.trainer.distributed import free_port
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), worker)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **env)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), path, *map(str, args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # its own process group: a timeout ends the workers too
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        raise
    assert proc.returncode == 0, out[-2000:] + err[-4000:]
