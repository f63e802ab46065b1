"""TRL's GRPOTrainer on gro_kernels: change one import (`GROGRPOTrainer`), keep TRL's config and loop.

    pip install "gro_kernels[integrations]"       # TRL 1.16
    python python/examples/trl_grpo_trainer.py                           # tiny local Llama, offline, seconds
    python python/examples/trl_grpo_trainer.py --model Qwen/Qwen2.5-0.5B-Instruct --steps 10

TRL does the sampling, rewards, advantages, old / reference log-probs, accumulation and logging;
its per-token log-prob step and its loss run on gro_kernels (no [tokens x vocab] logits). Options
gro_kernels cannot honour raise an error naming them (see gro_kernels/integrations/trl.py).
"""
import argparse

import torch
from datasets import Dataset
from trl import GRPOConfig

from gro_kernels.integrations.trl import GROGRPOTrainer
from tiny_local import save_tiny_llama


def reverse_reward(completions, answer, **_):
    """Fraction of the answer's characters in place."""
    return [sum(a == b for a, b in zip(c.strip(), t)) / len(t) for c, t in zip(completions, answer)]


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None, help="Hub model name or path (default: a tiny local Llama)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--loss-type", default="dapo")
    p.add_argument("--out", default="runs/trl_gro")
    args = p.parse_args(argv)

    model = args.model or save_tiny_llama()
    prompt = "reverse {}>" if args.model is None else "Reverse the digits {}. Answer with the digits only."
    rows = [{"prompt": prompt.format(n), "answer": str(n)[::-1]} for n in range(100, 164)]
    cuda = torch.cuda.is_available()
    cfg = GRPOConfig(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=8, num_generations=8,
                     gradient_accumulation_steps=2, max_completion_length=8, learning_rate=1e-3 if args.model is None
                     else 1e-6, loss_type=args.loss_type, logging_steps=1, report_to=[], save_strategy="no",
                     use_cpu=not cuda, bf16=cuda and torch.cuda.is_bf16_supported())
    trainer = GROGRPOTrainer(model=model, reward_funcs=reverse_reward, args=cfg, train_dataset=Dataset.from_list(rows))
    trainer.train()
    rewards = [(h["step"], h["reward"]) for h in trainer.state.log_history if "reward" in h]
    print("TRL GRPOTrainer on gro_kernels, mean reward per step: "
          + ", ".join(f"step {s} {r:.3f}" for s, r in rewards))
    return trainer.state.log_history


if __name__ == "__main__":
    main()
