"""One run: a method, a regime, a seed -> the reward curve and the held-out evaluation.

The loop is the trainer's step written out flat so that every method shares it: the same model
initialization (per seed), the same prompts per step (a seeded order per seed), K samples per
prompt for every method (the methods that do not learn from them still see them, and their
reward is the training curve), the prompts' offline answers, one forward, the method's loss,
gradient clipping and one AdamW step. Only the loss differs between methods.
"""
from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Dict, List, Optional

import torch

from ..trainer.rollout import collate, generate
from ..trainer.trainer import policy_inputs
from .methods import ALL_METHODS, method_loss, uses_rows
from .tasks import REGIMES, CharTokenizer, correct_answers, regime_data


@dataclass
class RunConfig:
    regime: str = "clean"
    method: str = "gro"
    knob: Optional[float] = None    # the method's one setting (methods.KNOBS); None for grpo, sft, luffy
    seed: int = 0
    steps: int = 300
    prompts_per_step: int = 16
    generations: int = 8            # K samples per prompt, per step (and k of pass@k)
    lr: float = 2e-3
    hidden: int = 64
    layers: int = 2
    backend: str = "torch"
    eval_split: str = "eval"        # "valid" when picking a knob, "eval" for the reported numbers


def require_transformers(command: str) -> None:
    """Stop with a message that says what to install, not a bare ModuleNotFoundError deep in a run."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise SystemExit(f"{command} trains a tiny Hugging Face Llama and needs the `transformers` package, which "
                         "is not installed.\nInstall it with:  pip install 'gro_kernels[train]'  "
                         "(or: pip install transformers)")


def build_model(vocab_size: int, seed: int, hidden: int = 64, layers: int = 2):
    """A tiny Llama from a config (no download), initialized from `seed`."""
    require_transformers("gro_kernels.experiments")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                      tie_word_embeddings=False, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg)


def step_prompts(rows: List[dict], seed: int, step: int, per_step: int) -> List[dict]:
    """The prompts of `step`: a seeded permutation per epoch, the same for every method of a seed."""
    n, out = len(rows), []
    for pos in range(step * per_step, (step + 1) * per_step):
        perm = list(range(n))
        random.Random(seed * 100003 + pos // n).shuffle(perm)
        out.append(rows[perm[pos % n]])
    return out


def answer_ids(tok: CharTokenizer, text: str) -> List[int]:
    """An offline answer laid out like a sampled completion (max_new_tokens = 3 digits, no EOS)."""
    return tok.encode(text, add_special_tokens=False)


@torch.no_grad()
def evaluate(model, tok, rows: List[dict], regime_name: str, k: int) -> Dict[str, float]:
    """Greedy reward, sampled reward, pass@k and distinct correct answers among k samples per prompt."""
    regime = REGIMES[regime_name]
    pids = [tok.encode(r["prompt"]) for r in rows]
    n_new = len(rows[0]["answer"])
    greedy = generate(model, pids, num_generations=1, max_new_tokens=n_new, pad_id=tok.pad_token_id,
                      eos_ids=[tok.eos_token_id], do_sample=False)
    g_text = [tok.decode(c) for c in greedy]
    g_r = regime.reward(None, g_text, answer=[r["answer"] for r in rows])
    samples = generate(model, pids, num_generations=k, max_new_tokens=n_new, pad_id=tok.pad_token_id,
                       eos_ids=[tok.eos_token_id], do_sample=True)
    s_text = [tok.decode(c) for c in samples]
    s_r = regime.reward(None, s_text, answer=[r["answer"] for r in rows for _ in range(k)])
    passes, distinct, coverage = 0.0, 0.0, 0.0
    for i, r in enumerate(rows):
        texts, rs = s_text[i * k:(i + 1) * k], s_r[i * k:(i + 1) * k]
        passes += float(max(rs) >= 1.0)
        right = {t for t, x in zip(texts, rs) if x >= 1.0}
        distinct += len(right)
        coverage += len(right) / len(correct_answers(regime.task, r["prompt"][:-1]))
    n = len(rows)
    return {"greedy_reward": sum(g_r) / n, "sampled_reward": sum(s_r) / len(s_r), f"pass_at_{k}": passes / n,
            "distinct_correct": distinct / n, "coverage": coverage / n}


def run(cfg: RunConfig, on_step: Optional[Callable[[dict], None]] = None) -> dict:
    """Train one model; returns {"config", "curve", "offline_reward", "initial", "final", "seconds"}.

    `on_step(record)` is called after every step with {"step", "reward", "offline_reward", "loss", "seconds",
    "samples", "prompts", "offline_answers"}
    (the demo writes its metrics and progress from it, so an interrupted run leaves its steps so far).
    """
    if cfg.method not in ALL_METHODS:
        raise ValueError(f"method must be one of {', '.join(ALL_METHODS)}; got {cfg.method!r}")
    regime = REGIMES[cfg.regime]
    data = regime_data(cfg.regime, cfg.seed)
    tok = CharTokenizer()
    teacher = train_teacher(cfg, data, tok) if cfg.method == "distill" else None
    model = build_model(len(tok), cfg.seed, cfg.hidden, cfg.layers)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    eval_rows = data[cfg.eval_split]
    initial = evaluate(model, tok, eval_rows, cfg.regime, cfg.generations)
    torch.manual_seed(cfg.seed + 1)  # the sampling stream starts the same for every method of a seed
    n_new = len(data["train"][0]["answer"])
    curve, off_curve, t0 = [], [], time.time()
    for step in range(cfg.steps):
        rows = step_prompts(data["train"], cfg.seed, step, cfg.prompts_per_step)
        pids = [tok.encode(r["prompt"]) for r in rows]
        comps = generate(model, pids, num_generations=cfg.generations, max_new_tokens=n_new,
                         pad_id=tok.pad_token_id, eos_ids=[tok.eos_token_id])
        texts = [tok.decode(c) for c in comps]
        rewards = regime.reward(None, texts, answer=[r["answer"] for r in rows for _ in range(cfg.generations)])
        P, C, G, OFF, R = [], [], [], [], []
        for g, r in enumerate(rows):
            for j in range(g * cfg.generations, (g + 1) * cfg.generations):
                P.append(pids[g]); C.append(comps[j]); G.append(g); OFF.append(False); R.append(rewards[j])
            if r["offline"] is not None:
                P.append(pids[g]); C.append(answer_ids(tok, r["offline"])); G.append(g); OFF.append(True)
                R.append(regime.reward(None, [r["offline"]], answer=[r["answer"]])[0])
        curve.append(sum(rewards) / len(rewards))
        offline_r = [x for x, o in zip(R, OFF) if o]
        off_curve.append(sum(offline_r) / len(offline_r) if offline_r else None)

        which = uses_rows(cfg.method, step, cfg.steps, cfg.knob)
        keep = [i for i, o in enumerate(OFF) if which == "both" or o == (which == "offline")]
        loss = train_step(cfg, model, opt, tok, step, [P[i] for i in keep], [C[i] for i in keep],
                          [G[i] for i in keep], [OFF[i] for i in keep], [R[i] for i in keep],
                          teacher=teacher) if keep else None
        # (no rows to learn from, e.g. sft on a step whose prompts have no offline answer: no update)
        if on_step is not None:
            on_step({"step": step + 1, "reward": curve[-1], "offline_reward": off_curve[-1], "loss": loss,
                     "seconds": time.time() - t0, "samples": len(comps), "prompts": [r["prompt"] for r in rows],
                     "offline_answers": [r["offline"] for r in rows]})
    seconds = time.time() - t0
    final = evaluate(model, tok, eval_rows, cfg.regime, cfg.generations)
    return {"config": asdict(cfg), "curve": curve, "offline_reward": off_curve, "initial": initial,
            "final": final, "seconds": seconds}


def train_teacher(cfg: RunConfig, data: dict, tok) -> torch.nn.Module:
    """The distillation teacher: the `sft` arm's model, i.e. the seed's initialization trained by SFT on the
    seed's offline answers, the same prompts in the same order for the same steps (no sampling: the SFT
    loss never reads the samples, so the model is the same). Frozen, in eval mode."""
    teacher = build_model(len(tok), cfg.seed, cfg.hidden, cfg.layers)
    opt = torch.optim.AdamW(teacher.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    sft = replace(cfg, method="sft", knob=None)
    for step in range(cfg.steps):
        rows = [r for r in step_prompts(data["train"], cfg.seed, step, cfg.prompts_per_step) if r["offline"] is not None]
        if rows:
            P = [tok.encode(r["prompt"]) for r in rows]
            C = [answer_ids(tok, r["offline"]) for r in rows]
            train_step(sft, teacher, opt, tok, step, P, C, list(range(len(rows))), [True] * len(rows), [0.0] * len(rows))
    return teacher.eval().requires_grad_(False)


def train_step(cfg: RunConfig, model, opt, tok, step: int, P, C, G, OFF, R, teacher=None) -> float:
    """One forward, the method's loss, clipping and one AdamW step on the given rows; returns the loss."""
    b = collate(P, C, pad_id=tok.pad_token_id, group_ids=G, offline=OFF, rewards=R)
    model.train()
    hidden, weight, _ = policy_inputs(model, b.input_ids, b.attention_mask, b.position_ids, b.prompt_len)
    teacher_head = None
    if teacher is not None:
        with torch.no_grad():
            th, tw, _ = policy_inputs(teacher, b.input_ids, b.attention_mask, b.position_ids, b.prompt_len)
        teacher_head = (th, tw)
    loss = method_loss(cfg.method, cfg.knob, hidden=hidden, weight=weight, targets=b.targets, rewards=b.rewards,
                       group_ids=b.group_ids, offline=b.offline, step=step, steps=cfg.steps, backend=cfg.backend,
                       teacher=teacher_head)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return float(loss.detach())
