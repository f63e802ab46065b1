"""One GRPO loss step (forward + backward, the model included) through TRL's GRPOTrainer, with TRL's
own fused head or patched onto gro_kernels: time and peak memory, one implementation per process.

    python bench/trl_step.py --vocab 32768              # both, CPU, one thread each
    python bench/trl_step.py --impl gro --device cuda   # one of them on a GPU

A 1-layer Llama (d=256) with a large vocabulary makes the head dominate; 8 completions of 224 tokens
after 32-token prompts, loss_type dapo, off-policy old log-probs. Peak memory is the process's peak
RSS on CPU, torch.cuda.max_memory_allocated on CUDA, both also shown before the first loss step.
"""
import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(impl, vocab, device, path):
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    sys.path.insert(0, os.path.join(ROOT, "python", "examples"))
    from tiny_local import char_tokenizer

    torch.set_num_threads(1)
    if not os.path.exists(os.path.join(path, "config.json")):
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          pad_token_id=0, eos_token_id=1, bos_token_id=1)
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(path)
    B, P, K = 8, 32, 224
    args = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=B, num_generations=B,
                      max_completion_length=K, use_cpu=device == "cpu", bf16=False, report_to=[], save_strategy="no",
                      loss_type="dapo")
    trainer = GRPOTrainer(model=path, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["a"] * B}), processing_class=char_tokenizer())
    if impl == "gro":
        from gro_kernels.integrations.trl import patch_trainer
        patch_trainer(trainer)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    dev = trainer.accelerator.device
    g = torch.Generator().manual_seed(0)
    batch = dict(prompt_ids=torch.randint(2, vocab, (B, P), generator=g),
                 prompt_mask=torch.ones(B, P, dtype=torch.long),
                 completion_ids=torch.randint(2, vocab, (B, K), generator=g),
                 completion_mask=torch.ones(B, K, dtype=torch.long), advantages=torch.randn(B, generator=g),
                 num_items_in_batch=torch.tensor(float(B * K)), old_per_token_logps=-10 * torch.rand(B, K, generator=g))
    batch = {k: v.to(dev) for k, v in batch.items()}
    cuda = dev.type == "cuda"

    def memory():
        return torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    before = memory()
    times = []
    for _ in range(4):  # the first is a warm-up
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        trainer.model.zero_grad(set_to_none=False)
    print(f"{impl:>4}  V={vocab}  tokens={B * K}  loss {loss.item():+.6f}  median {sorted(times[1:])[1] * 1e3:.0f} ms  "
          f"peak {'allocated' if cuda else 'RSS'} {memory() / 2**20:.0f} MiB "
          f"(before the first step {before / 2**20:.0f} MiB)")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--impl", choices=["trl", "gro", "both"], default="both")
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--device", default="cpu")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--path", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a.impl, a.vocab, a.device, a.path)
    path = a.path or tempfile.mkdtemp(prefix="trl_step_")
    for impl in (["trl", "gro"] if a.impl == "both" else [a.impl]):
        subprocess.run([sys.executable, __file__, "--worker", "--impl", impl, "--vocab", str(a.vocab), "--device",
                        a.device, "--path", path], check=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))


if __name__ == "__main__":
    main()
