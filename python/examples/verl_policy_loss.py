"""verl's policy loss on the GRO objective, and verl's fused log-prob kernel on gro_kernels.

    pip install --no-deps verl==0.9.1 && pip install omegaconf "tensordict<=0.10" packaging ray codetiming
    python python/examples/verl_policy_loss.py

In a verl run, call `register()` in the worker process before the actor is built and set
`actor_rollout_ref.actor.policy_loss.loss_mode=gro_vanilla` (or gro_gspo, gro_gpg). This script
checks the registered loss against verl's own on one random batch (no model, no cluster).
"""
import torch
from verl.trainer.ppo import core_algos
from verl.workers.config.actor import ActorConfig

from gro_kernels.integrations.verl import register


def main():
    names = register(fused_kernels=True)
    config = ActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=2, rollout_n=1, ppo_mini_batch_size=4,
                         clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)
    torch.manual_seed(0)
    old = -3 * torch.rand(4, 16)
    logp = (old + 0.3 * torch.randn(4, 16)).clamp(max=0).requires_grad_()
    adv = torch.randn(4, 1).expand(4, 16)
    mask = (torch.arange(16)[None] < torch.tensor([[16], [9], [4], [12]])).float()
    for name in ("vanilla", "gspo", "gpg"):
        theirs, _ = core_algos.get_policy_loss_fn(name)(old, logp, adv, mask, "token-mean", config)
        ours, metrics = core_algos.get_policy_loss_fn(f"gro_{name}")(old, logp, adv, mask, "token-mean", config)
        print(f"{name:>8}: verl {theirs.item():+.6f}   gro_{name} {ours.item():+.6f}   {metrics}")
    print("registered:", ", ".join(names))


if __name__ == "__main__":
    main()
