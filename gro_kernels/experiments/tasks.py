"""Tasks, prompts and the five offline-data regimes (`clean`, `scarce`, `noisy`, `graded`, `diverse`).

Every regime is a prompt set split once into training and evaluation prompts that share no
prompt, a reward function, and an offline dataset: for each training prompt, at most one offline
answer (or none). Every method sees exactly this data; only what it does with it differs.

* `clean`   reverse 3 digits ("314>" -> "413"), exact-match reward; a gold answer for every prompt.
* `scarce`  the same, with a gold answer for 10% of the training prompts only.
* `noisy`   the same, with offline answers from a teacher that reverses 40% of the prompts and
            copies the digits of the others (a systematic error, as a weaker model makes; a copied
            palindrome is right, so the teacher is right ~47% of the time), scored by the same
            reward as the online samples.
* `graded`  partial credit (fraction of positions right); offline answers of mixed quality:
            0, 1, 2 or 3 of the 3 digits corrupted, equally often.
* `diverse` write any permutation of the prompt's 3 digits ("314>" -> "143", "431", ...), up to 6
            correct answers per prompt; one offline answer per prompt (a random permutation).
            Reported with pass@k and the number of distinct correct answers among k samples.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

DIGITS = 3          # every prompt is 3 digits: 1000 prompts in all
N_EVAL = 200        # evaluation prompts (never trained on)
N_VALID = 100       # validation prompts (never trained on; used only to pick a method's knob)
SPLIT_SEED = 12345  # the split is the same for every run, so every seed evaluates the same prompts


class CharTokenizer:
    """Character-level: <pad> <bos> <eos>, '>' (the separator), the digits."""

    specials = ("<pad>", "<bos>", "<eos>")

    def __init__(self, chars: str = ">0123456789"):
        self.itos = list(self.specials) + list(chars)
        self.stoi = {c: i for i, c in enumerate(self.itos)}
        self.pad_token_id, self.bos_token_id, self.eos_token_id = 0, 1, 2

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        ids = [self.stoi[c] for c in text]
        return [self.bos_token_id] + ids if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Drops <eos>; a generated <pad> or <bos> shows as '_' (it is a wrong character, not nothing)."""
        return "".join("_" if int(i) < len(self.specials) else self.itos[int(i)]
                       for i in ids if int(i) != self.eos_token_id)


# ---- rewards: (prompts, completions, **columns) -> list of floats in [0, 1] ----------------------
def exact_reward(prompts, completions, answer, **_) -> List[float]:
    """1 for the exact answer, else 0."""
    return [1.0 if c == a else 0.0 for c, a in zip(completions, answer)]


def partial_reward(prompts, completions, answer, **_) -> List[float]:
    """Fraction of positions right, over max(len(answer), len(completion)): 1 only for the exact answer."""
    return [sum(1 for x, y in zip(c, a) if x == y) / max(len(a), len(c), 1) for c, a in zip(completions, answer)]


def permutation_reward(prompts, completions, answer, **_) -> List[float]:
    """1 when the completion is a permutation of the prompt's digits (`answer` holds them), else 0."""
    return [1.0 if sorted(c) == sorted(a) else 0.0 for c, a in zip(completions, answer)]


def correct_answers(task: str, digits: str) -> List[str]:
    """Every answer with reward 1 for a prompt's digits."""
    if task == "reverse":
        return [digits[::-1]]
    import itertools
    return sorted({"".join(p) for p in itertools.permutations(digits)})


# ---- regimes --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Regime:
    name: str
    task: str                      # reverse | permute
    reward: Callable               # a reward function above
    offline: Callable              # (digits, rng) -> offline answer or None
    description: str


def _gold(digits, rng):
    return digits[::-1]


def _scarce(digits, rng):
    return digits[::-1] if rng.random() < 0.10 else None


def _noisy(digits, rng):
    return digits[::-1] if rng.random() < 0.40 else digits  # wrong: copies instead of reversing


def _graded(digits, rng):
    gold = list(digits[::-1])
    for pos in rng.sample(range(len(gold)), rng.randrange(len(gold) + 1)):
        gold[pos] = rng.choice([d for d in "0123456789" if d != gold[pos]])
    return "".join(gold)


def _diverse(digits, rng):
    perm = list(digits)
    rng.shuffle(perm)
    return "".join(perm)


REGIMES: Dict[str, Regime] = {r.name: r for r in (
    Regime("clean", "reverse", exact_reward, _gold, "reverse 3 digits, exact match; a gold answer for every prompt"),
    Regime("scarce", "reverse", exact_reward, _scarce, "reverse 3 digits, exact match; gold for 10% of prompts"),
    Regime("noisy", "reverse", exact_reward, _noisy,
           "reverse 3 digits, exact match; the teacher is right 40% of the time, otherwise copies the digits"),
    Regime("graded", "reverse", partial_reward, _graded,
           "reverse 3 digits, partial credit; offline answers with 0-3 of 3 digits wrong"),
    Regime("diverse", "permute", permutation_reward, _diverse,
           "any permutation of 3 digits (up to 6 correct answers); one random permutation offline"),
)}


def split_prompts() -> Dict[str, List[str]]:
    """All 1000 3-digit strings, split once into disjoint train / valid / eval lists."""
    every = [f"{i:0{DIGITS}d}" for i in range(10 ** DIGITS)]
    random.Random(SPLIT_SEED).shuffle(every)
    return {"eval": every[:N_EVAL], "valid": every[N_EVAL:N_EVAL + N_VALID], "train": every[N_EVAL + N_VALID:]}


def reward_answer(regime: Regime, digits: str) -> str:
    """The `answer` column the reward reads: the reversal, or the digits themselves (permutation task)."""
    return digits[::-1] if regime.task == "reverse" else digits


def make_rows(regime: Regime, digits_list: List[str], *, offline_seed: Optional[int]) -> List[dict]:
    """Dataset rows {"prompt", "answer", "offline"}: offline is None without offline data (eval prompts)."""
    rng = random.Random(offline_seed) if offline_seed is not None else None
    rows = []
    for d in digits_list:
        off = regime.offline(d, rng) if rng is not None else None
        rows.append({"prompt": d + ">", "answer": reward_answer(regime, d), "offline": off})
    return rows


def regime_data(name: str, seed: int) -> Dict[str, List[dict]]:
    """Train rows (with this seed's offline answers), valid and eval rows (no offline answers)."""
    if name not in REGIMES:
        raise ValueError(f"regime must be one of {', '.join(REGIMES)}; got {name!r}")
    regime, split = REGIMES[name], split_prompts()
    return {"train": make_rows(regime, split["train"], offline_seed=seed * 7919 + 17),
            "valid": make_rows(regime, split["valid"], offline_seed=None),
            "eval": make_rows(regime, split["eval"], offline_seed=None)}
