"""Offline data: gold answers, preference pairs and labelled answers (docs/objective.md, "Offline rows").

Two uses:

* **Mixed into online groups.** A prompt-dataset row may carry gold completion(s) in a column
  (`GROConfig.offline_column`). Those rows join the prompt's group: same group id as its K online
  samples, `offline=True` (the `logp` surrogate, no importance ratio, no `old_logp` needed) and a
  reward (`GROConfig.offline_reward`, or the reward functions' score). They share the group's
  anchor, so a gold answer among failed samples is the group's only positive.
* **Pure offline training** (no sampling), for DPO / IPO / CPL / SimPO / KTO / SFT-style data.
  A dataset row's keys say what it is:

  | keys                              | rows made                   | label | group         |
  |-----------------------------------|-----------------------------|-------|---------------|
  | `prompt, chosen, rejected`        | 2 (a preference pair)       | +1/-1 | one per pair  |
  | `prompt, completion, label`       | 1 (KTO: desirable or not)   | +1/-1 | one per row   |
  | `prompt, completion, reward`      | 1 (a scored answer)         | -     | one per prompt|
  | `prompt, completion`              | 1 (a demonstration, SFT)    | +1    | one per row   |
"""
from __future__ import annotations

from typing import List, Optional, Sequence

from .rollout import Batch, collate


# ---- tokenizer adapters (HF tokenizers, or any object with encode/decode) -----------------------
def encode_prompt(tokenizer, text: str) -> List[int]:
    return list(tokenizer.encode(text))


def encode_completion(tokenizer, text: str, eos_id: int) -> List[int]:
    """Completion tokens with EOS appended (no BOS): what a generated completion looks like."""
    try:
        ids = list(tokenizer.encode(text, add_special_tokens=False))
    except TypeError:
        ids = list(tokenizer.encode(text))
    return ids + [eos_id]


def decode_completion(tokenizer, ids: Sequence[int]) -> str:
    try:
        return tokenizer.decode(list(ids), skip_special_tokens=True)
    except TypeError:
        return tokenizer.decode(list(ids))


# ---- gold answers mixed into online groups -------------------------------------------------------
def gold_completions(row: dict, column: Optional[str], limit: int) -> List[str]:
    """Up to `limit` gold completions held in `row[column]` (a string or a list of strings)."""
    if not column or column not in row or row[column] is None:
        return []
    value = row[column]
    items = [value] if isinstance(value, str) else list(value)
    return [str(x) for x in items[:limit]]


# ---- pure offline batches ------------------------------------------------------------------------
def row_kind(row: dict) -> str:
    if "prompt" not in row:
        raise ValueError(f"an offline row needs a 'prompt' key, got keys {sorted(row)}")
    if "chosen" in row and "rejected" in row:
        return "pair"
    if "completion" not in row:
        raise ValueError("an offline row needs 'chosen' and 'rejected', or 'completion' "
                         f"(with optional 'label' or 'reward'); got keys {sorted(row)}")
    if "label" in row:
        return "labelled"
    if "reward" in row:
        return "scored"
    return "demonstration"


def offline_batch(rows: Sequence[dict], tokenizer, *, eos_id: int, pad_id: int, group_offset: int = 0,
                  device=None) -> Batch:
    """A `Batch` of offline rows (see the module docstring for the row kinds)."""
    prompt_ids, completion_ids, groups, labels, rewards, prompts, completions = [], [], [], [], [], [], []
    prompt_group = {}
    next_group = group_offset
    kinds = set()
    for row in rows:
        kind = row_kind(row)
        kinds.add(kind)
        p = encode_prompt(tokenizer, row["prompt"])
        if kind == "pair":
            for text, lab in ((row["chosen"], 1), (row["rejected"], -1)):
                prompt_ids.append(p)
                completion_ids.append(encode_completion(tokenizer, text, eos_id))
                groups.append(next_group)
                labels.append(lab)
                rewards.append(1.0 if lab > 0 else 0.0)
                prompts.append(row["prompt"])
                completions.append(text)
            next_group += 1
            continue
        if kind == "scored":
            if row["prompt"] not in prompt_group:
                prompt_group[row["prompt"]] = next_group
                next_group += 1
            g = prompt_group[row["prompt"]]
            lab = 1
            reward = float(row["reward"])
        else:
            g = next_group
            next_group += 1
            lab = (1 if row["label"] else -1) if kind == "labelled" else 1
            reward = 1.0 if lab > 0 else 0.0
        prompt_ids.append(p)
        completion_ids.append(encode_completion(tokenizer, row["completion"], eos_id))
        groups.append(g)
        labels.append(lab)
        rewards.append(reward)
        prompts.append(row["prompt"])
        completions.append(row["completion"])
    if len(kinds) > 1 and "pair" in kinds:
        raise ValueError(f"an offline batch mixes preference pairs with other rows ({sorted(kinds)}); "
                         "keep one kind per dataset")
    return collate(prompt_ids, completion_ids, pad_id=pad_id, group_ids=groups, offline=[True] * len(groups),
                   rewards=rewards, labels=labels, prompts=prompts, completions=completions, device=device)
