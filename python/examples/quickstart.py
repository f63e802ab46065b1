"""Every method's loss on one small random batch, straight from hidden states and the LM head.

Eight sequences in four groups of two: each pair has a reward (for the RL methods) and a
chosen/rejected label (for the preference methods), so one batch feeds every preset.
"""
import torch

from gro_kernels import METHODS, gro_loss
from gro_kernels.objective.inputs import read_inputs

torch.manual_seed(0)
B, T, d, V = 8, 12, 64, 1000
hidden = torch.randn(B, T, d, requires_grad=True)
weight = (torch.randn(V, d) / d**0.5).requires_grad_()
targets = torch.randint(0, V, (B, T))
targets[:, :3] = -100  # prompt tokens are not scored
targets[1, 9:] = -100  # a shorter response
batch = dict(
    rewards=torch.tensor([1.0, 0.0, 0.5, 0.2, 0.0, 1.0, 0.9, 0.1]),
    group_ids=torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]),
    labels=torch.tensor([1, -1, 1, -1, -1, 1, 1, -1]),
    baselines=torch.full((B,), 0.4),
)
with torch.no_grad():
    ref_logp = gro_loss(hidden, weight + 0.01 * torch.randn(V, d), targets, method="sft").logp
    old_logp = ref_logp + 0.05 * torch.randn(B, T)
teacher_hidden, teacher_weight = torch.randn(B, T, 96), torch.randn(V, 96) / 96**0.5

print(f"{'method':>17}  {'loss':>10}  {'|grad hidden|':>13}  notes")
for method in METHODS:
    kw = dict(ref_logp=ref_logp, old_logp=old_logp)
    if method in ("remax", "reinforce"):
        kw.update(baselines=batch["baselines"], anchor="baseline")
    if method in ("dpo", "ipo", "cpl", "simpo", "orpo", "cpo"):
        kw.update(labels=batch["labels"], group_ids=batch["group_ids"])
    elif method == "kto":  # KTO's reference point z0: a batch estimate of KL(policy || reference)
        kw.update(labels=batch["labels"], anchor_value=0.05)
    elif method == "apo_zero_unpaired":  # KTO with z0 = 0
        kw.update(labels=batch["labels"])
    elif method not in ("sft", "dft"):
        kw.update(rewards=batch["rewards"], group_ids=batch["group_ids"])
    if method in ("gro", "luffy", "chord", "hpt"):  # a dataset answer in the first group
        kw["offline"] = torch.tensor([True, False, False, False, False, False, False, False])
    if method == "distill":  # a teacher head (its hidden size may differ): the exact reverse KL per token
        kw.update(teacher_hidden=teacher_hidden, teacher_weight=teacher_weight)
    kw = read_inputs(method, kw)  # old_logp, group_ids, ... only where the method reads them (else refused)
    hidden.grad = None
    out = gro_loss(hidden, weight, targets, method=method, **kw)
    out.loss.backward()
    note = f"clip_frac {out.metrics['clip_frac']:.2f}" if "clip_frac" in out.metrics else ""
    print(f"{method:>17}  {out.loss.item():>10.5f}  {hidden.grad.norm().item():>13.5f}  {note}")
