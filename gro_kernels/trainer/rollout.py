"""Rollouts: sample K completions per prompt, score them, lay them out as one padded batch.

Layout of a `Batch` (every row, online or offline):

    input_ids  = [ left-padded prompt (width P) | right-padded completion (width C) ]
    targets    = input_ids[:, P:] where the completion is real (EOS included), else -100

The hidden state at column `P - 1 + j` predicts completion token `j`, so the loss only ever sees
`hidden[:, P-1:-1]` (`[N, C, d]`): prompt positions never reach the vocabulary projection.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Callable, List, Optional, Sequence

import torch

IGNORE_INDEX = -100

RewardFunc = Callable[..., Sequence[float]]  # (prompts, completions, **columns) -> list of floats


@dataclass
class Batch:
    """One step's rows. Tensors are `[N, ...]`; a group (prompt) may span online and offline rows."""

    input_ids: torch.Tensor            # [N, P + C] long
    attention_mask: torch.Tensor       # [N, P + C] long
    position_ids: torch.Tensor         # [N, P + C] long (counting from the first real prompt token)
    targets: torch.Tensor              # [N, C] long, IGNORE_INDEX off the completion
    prompt_len: int                    # P
    group_ids: torch.Tensor            # [N] long
    offline: torch.Tensor              # [N] bool
    rewards: Optional[torch.Tensor] = None    # [N] float32
    labels: Optional[torch.Tensor] = None     # [N] long in {+1, -1}
    baselines: Optional[torch.Tensor] = None  # [N] float32 (ReMax: the greedy completion's reward)
    old_logp: Optional[torch.Tensor] = None   # [N, C] float32, filled by the trainer
    ref_logp: Optional[torch.Tensor] = None   # [N, C] float32, filled by the trainer
    advantages: Optional[torch.Tensor] = None  # [N, C] float32 A[i,t] formed on the whole batch, by the trainer
    truncated: Optional[torch.Tensor] = None  # [N] bool: completion cut at max_new_tokens (no EOS), by the trainer
    prompts: List[str] = field(default_factory=list)
    completions: List[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: Sequence[int]) -> "Batch":
        """Rows `index` (a list of row numbers), keeping the prompt width."""
        idx = torch.as_tensor(list(index), dtype=torch.long)
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                out[f.name] = v[idx.to(v.device)]
            elif isinstance(v, list):
                out[f.name] = [v[i] for i in idx.tolist()] if v else []
            else:
                out[f.name] = v
        return Batch(**out)

    def to(self, device) -> "Batch":
        return replace(self, **{f.name: getattr(self, f.name).to(device)
                                for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)})

    def num_tokens(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())

    def group_slices(self) -> List[List[int]]:
        """Row numbers of each group, groups in order of first appearance."""
        order, rows = [], {}
        for i, g in enumerate(self.group_ids.tolist()):
            if g not in rows:
                rows[g] = []
                order.append(g)
            rows[g].append(i)
        return [rows[g] for g in order]


def collate(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], *, pad_id: int,
            group_ids: Sequence[int], offline: Optional[Sequence[bool]] = None,
            rewards: Optional[Sequence[float]] = None, labels: Optional[Sequence[int]] = None,
            baselines: Optional[Sequence[float]] = None, prompts: Sequence[str] = (),
            completions: Sequence[str] = (), device=None) -> Batch:
    """Pad token-id lists into a `Batch` (prompts left-padded, completions right-padded)."""
    n = len(prompt_ids)
    if len(completion_ids) != n or len(group_ids) != n:
        raise ValueError("prompt_ids, completion_ids and group_ids must have the same length")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token (e.g. BOS)")
    P = max(len(p) for p in prompt_ids)
    C = max(1, max(len(c) for c in completion_ids))
    ids = torch.full((n, P + C), pad_id, dtype=torch.long)
    am = torch.zeros((n, P + C), dtype=torch.long)
    tgt = torch.full((n, C), IGNORE_INDEX, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        ids[i, P - len(p):P] = torch.as_tensor(list(p), dtype=torch.long)
        am[i, P - len(p):P] = 1
        if len(c):
            ids[i, P:P + len(c)] = torch.as_tensor(list(c), dtype=torch.long)
            am[i, P:P + len(c)] = 1
            tgt[i, :len(c)] = ids[i, P:P + len(c)]
    pos = (am.cumsum(1) - 1).clamp(min=0)

    def vec(x, dtype):
        return None if x is None else torch.as_tensor(list(x), dtype=dtype)

    batch = Batch(
        input_ids=ids, attention_mask=am, position_ids=pos, targets=tgt, prompt_len=P,
        group_ids=vec(group_ids, torch.long),
        offline=vec(offline, torch.bool) if offline is not None else torch.zeros(n, dtype=torch.bool),
        rewards=vec(rewards, torch.float32), labels=vec(labels, torch.long),
        baselines=vec(baselines, torch.float32), prompts=list(prompts), completions=list(completions),
    )
    return batch.to(device) if device is not None else batch


def truncate_at_eos(ids: Sequence[int], eos_ids: Sequence[int]) -> List[int]:
    """Completion tokens up to and including the first EOS."""
    out = []
    for t in ids:
        out.append(int(t))
        if int(t) in eos_ids:
            break
    return out


@torch.no_grad()
def generate(model, prompt_ids: Sequence[Sequence[int]], *, num_generations: int, max_new_tokens: int,
             pad_id: int, eos_ids: Sequence[int], do_sample: bool = True, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> List[List[int]]:
    """`num_generations` completions for each prompt (prompt-major order), each cut after its first EOS."""
    device = next(model.parameters()).device
    rows = [p for p in prompt_ids for _ in range(num_generations)]
    P = max(len(p) for p in rows)
    ids = torch.full((len(rows), P), pad_id, dtype=torch.long)
    am = torch.zeros_like(ids)
    for i, p in enumerate(rows):
        ids[i, P - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        am[i, P - len(p):] = 1
    kwargs = dict(do_sample=do_sample, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                  eos_token_id=list(eos_ids))
    if do_sample:
        kwargs.update(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p or None)
    else:  # silence "temperature is set but do_sample=False" style warnings from a model's defaults
        kwargs.update(temperature=None, top_k=None, top_p=None, min_p=None)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=ids.to(device), attention_mask=am.to(device), **kwargs)
    finally:
        model.train(was_training)
    return [truncate_at_eos(row, eos_ids) for row in out[:, P:].tolist()]


def score(reward_funcs: Sequence[RewardFunc], prompts: List[str], completions: List[str], columns: dict,
          reward_weights: Optional[Sequence[float]] = None) -> torch.Tensor:
    """Weighted sum of the reward functions, one float per completion; non-finite rewards are an error."""
    if not reward_funcs:
        raise ValueError("online training needs at least one reward function")
    weights = list(reward_weights) if reward_weights is not None else [1.0] * len(reward_funcs)
    if len(weights) != len(reward_funcs):
        raise ValueError("reward_weights must have one weight per reward function")
    total = torch.zeros(len(completions), dtype=torch.float32)
    for fn, w in zip(reward_funcs, weights):
        r = fn(prompts, completions, **columns)
        r = torch.as_tensor([float(x) for x in r], dtype=torch.float32)
        if r.shape != total.shape:
            raise ValueError(f"reward function {getattr(fn, '__name__', fn)} returned {r.numel()} values "
                             f"for {len(completions)} completions")
        if not torch.isfinite(r).all():
            raise ValueError(f"reward function {getattr(fn, '__name__', fn)} returned a non-finite reward")
        total += w * r
    return total
