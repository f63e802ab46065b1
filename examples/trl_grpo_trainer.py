"""TRL's `GRPOTrainer` with its loss replaced by `gro_loss` (the logits are never materialized).

    pip install trl   # this example only; gro_kernels does not depend on TRL
    python examples/trl_grpo_trainer.py --model Qwen/Qwen2.5-0.5B-Instruct --steps 10

TRL does the sampling, reward scoring, advantage computation, old/ref log-probs and distribution;
`GROGRPOTrainer.compute_loss` only swaps the loss: hidden states from the backbone, then
`gro_loss(hidden, lm_head.weight, targets, advantages=..., old_logp=..., ref_logp=...)` with TRL's
clipping / KL / aggregation settings mapped to GRO options.

Distributed note: under accelerate/DDP the forward must go through the wrapped `model` so DDP
synchronizes gradients. We call `model(..., output_hidden_states=True, logits_to_keep=1)` (logits
for one position only) and read the last hidden state; `lm_head.weight` is then used by `gro_loss`
in the same backward, so its gradient is synchronized too (DDP's hook fires on the summed gradient).

Written against TRL's GRPOTrainer input layout (`prompt_ids`, `prompt_mask`, `completion_ids`,
`completion_mask`, `advantages`, `old_per_token_logps`, `ref_per_token_logps`); not run in CI
(it would train a real model); CI checks that it exits cleanly where TRL is missing.
"""
import argparse
import sys

try:
    from trl import GRPOConfig, GRPOTrainer
except ImportError:
    print("examples/trl_grpo_trainer.py: TRL is not installed (pip install trl); skipping.")
    sys.exit(0)

import torch

from gro_kernels.loss import gro_loss

# TRL's loss_type -> GRO aggregation
AGGREGATION = {"grpo": "seq_mean_token_mean", "bnpo": "token_mean", "dapo": "token_mean",
               "dr_grpo": "seq_mean_token_sum_norm"}


class GROGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose loss is `gro_loss` (method `grpo` on TRL's advantages)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("GROGRPOTrainer does not return outputs")
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        C = completion_ids.shape[1]

        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                    logits_to_keep=1, use_cache=False)
        hidden = out.hidden_states[-1][:, -C - 1:-1]            # states predicting the completion tokens
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        weight = head.weight if hidden.dtype == head.weight.dtype else head.weight.to(hidden.dtype)
        targets = completion_ids.masked_fill(completion_mask == 0, -100)

        agg = AGGREGATION.get(self.loss_type, "seq_mean_token_mean")
        options = dict(temperature=self.temperature, eps_low=self.epsilon_low, eps_high=self.epsilon_high,
                       kl_coef=self.beta, kl_estimator="k3", loss_agg=agg)
        if agg == "seq_mean_token_sum_norm":
            options["max_completion_length"] = self.max_completion_length
        extra = {}
        if agg == "token_mean" and inputs.get("num_items_in_batch") is not None:
            # TRL's count is over all processes; DDP averages over them, so scale the loss back up
            extra["num_items_in_batch"] = inputs["num_items_in_batch"] / self.accelerator.num_processes
        res = gro_loss(hidden, weight, targets, method="grpo", advantages=inputs["advantages"],
                       old_logp=inputs.get("old_per_token_logps"),
                       ref_logp=inputs.get("ref_per_token_logps") if self.beta != 0 else None,
                       **extra, **options)
        mode = "train" if self.model.training else "eval"
        if hasattr(self, "_metrics"):
            for k in ("kl", "entropy", "clip_frac"):
                if k in res.metrics:
                    self._metrics[mode].setdefault(f"gro/{k}", []).append(float(res.metrics[k]))
        return res.loss


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", default="runs/trl_gro")
    args = p.parse_args()
    from datasets import Dataset

    rows = [{"prompt": f"Reverse the digits {n}. Answer with the digits only.", "answer": str(n)[::-1]}
            for n in range(1000, 1064)]

    def reverse_reward(completions, answer, **_):
        return [float(c.strip().startswith(a)) for c, a in zip(completions, answer)]

    cfg = GRPOConfig(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=8,
                     num_generations=8, max_completion_length=16, learning_rate=1e-6, logging_steps=1,
                     report_to=[])
    trainer = GROGRPOTrainer(model=args.model, reward_funcs=reverse_reward, args=cfg,
                             train_dataset=Dataset.from_list(rows))
    trainer.train()


if __name__ == "__main__":
    main()
