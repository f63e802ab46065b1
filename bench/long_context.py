#!/usr/bin/env python
"""Long context on the CPU: peak memory of one training step against sequence length.

    python bench/long_context.py                       # 2k..64k tokens, three log-prob paths, ~20 min on 2 cores
    python bench/long_context.py --lengths 4096 --impls gro
    python bench/long_context.py --one gro 32768       # one point in this process (what each worker runs)
    BENCH_PACK=1 python bench/long_context.py --one gro 4096   # the two rows packed into one sequence

A small Qwen2-shaped model (d=128, 2 layers, Qwen's vocabulary V=151936, float32, SDPA attention,
gradient checkpointing) takes one optimizer step (forward, backward, AdamW) of a GRPO-style loss
on one group of two sampled sequences of T/2 tokens each (T tokens in all; equal lengths, so no
padding). Only how the per-token log-probs are obtained differs:

- `gro`:   `GROTrainer.train_step` - the backbone's final hidden states and `lm_head.weight` go to
           `gro_loss` (torch backend): the `[T, V]` logits never exist;
- `plain`: Hugging Face `model(...).logits`, then `log_softmax` and a gather;
- `trl`:   TRL's GRPO log-prob path: `model(..., logits_to_keep=...).logits / temperature`, then
           `trl.trainer.utils.selective_log_softmax` (its CPU path: a gather minus a per-row
           `logsumexp`). Needs `pip install trl`; without it the same two lines are written here
           from TRL's semantics (the report says which ran).

Each point runs in a fresh subprocess; its peak resident memory (`ru_maxrss`) is the figure, and
the resident memory before the step (model, optimizer, inputs built) is reported beside it. A
series stops when its next point is predicted (linear in T from the points so far) to exceed
`--limit-gib` (24 GiB, a 24 GB card's budget) or the `--run-limit-gib` this machine can afford
(other jobs share its memory); such points are reported as predicted, never as measured.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
VOCAB = 151936
IMPLS = ("gro", "plain", "trl")
LENGTHS = (2048, 4096, 8192, 16384, 32768, 65536)
GIB = 2.0 ** 30


def rss_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / GIB
    return float("nan")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def build_model(max_len: int):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_len + 8,
                      tie_word_embeddings=False, use_cache=False, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    model = Qwen2ForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def make_rows(total: int):
    """Two rows (one group) of total/2 tokens: a 1-token prompt and a completion of the rest."""
    import torch

    g = torch.Generator().manual_seed(1)
    half = total // 2
    comps = [torch.randint(3, VOCAB, (half - 1,), generator=g).tolist() for _ in range(2)]
    return [[0], [0]], comps


def loss_from_logp(logp, mask, advantages):
    """GRPO on-policy (ratio 1, no KL), token mean: the same loss for the plain and trl rows."""
    return -((advantages[:, None] * logp) * mask).sum() / mask.sum()


def step_gro(total: int):
    import torch
    from types import SimpleNamespace

    from gro_kernels.trainer import GROConfig, GROTrainer, collate

    model = build_model(total)
    prompts, comps = make_rows(total)
    tok = SimpleNamespace(eos_token_id=1, pad_token_id=2)
    cfg = GROConfig(method="grpo", loss_options={"kl_coef": 0.0}, backend="torch", micro_batch_size=2,
                    num_generations=2, prompts_per_step=1, output_dir="/tmp/unused", metrics_file=None,
                    save_final=False, progress=False, max_grad_norm=1.0, gradient_checkpointing=True,
                    pack_sequences=os.environ.get("BENCH_PACK") == "1")
    trainer = GROTrainer(model, tok, reward_funcs=[lambda p, c, **k: [0.0] * len(c)], train_dataset=[{"prompt": ""}],
                         config=cfg)
    batch = collate(prompts, comps, pad_id=2, group_ids=[0, 0], rewards=[1.0, 0.0])
    assert int(batch.attention_mask.sum()) == total  # no padding
    torch.set_grad_enabled(True)
    base = rss_gib()
    t = time.perf_counter()
    m = trainer.train_step(batch)
    return base, time.perf_counter() - t, m["loss"]


def _logits_step(total: int, logprob_fn):
    import torch

    model = build_model(total)
    prompts, comps = make_rows(total)
    ids = torch.tensor([p + c for p, c in zip(prompts, comps)])
    targets = ids[:, 1:]
    mask = torch.ones_like(targets, dtype=torch.float32)
    adv = torch.tensor([0.7071, -0.7071])  # GRPO's weights for rewards (1, 0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    base = rss_gib()
    t = time.perf_counter()
    logp = logprob_fn(model, ids, targets)
    loss = loss_from_logp(logp, mask, adv)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return base, time.perf_counter() - t, float(loss)


def plain_logprobs(model, ids, targets):
    import torch

    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, :-1]
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None])[..., 0]


def trl_logprobs(model, ids, targets):
    import torch

    try:
        from trl.trainer.utils import selective_log_softmax
    except ImportError:  # TRL's CPU path (trl/trainer/utils.py), written from its semantics
        def selective_log_softmax(logits, index):
            picked = torch.gather(logits, dim=-1, index=index[..., None])[..., 0]
            return picked - torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
    keep = targets.shape[1] + 1  # TRL: logits_to_keep = completion length + 1, then drop the last
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=keep).logits[:, :-1]
    return selective_log_softmax(logits / 1.0, targets)


def run_one(impl: str, total: int) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    if impl == "gro":
        base, secs, loss = step_gro(total)
    elif impl == "plain":
        base, secs, loss = _logits_step(total, plain_logprobs)
    else:
        base, secs, loss = _logits_step(total, trl_logprobs)
    out = dict(impl=impl, tokens=total, peak_gib=peak_rss_gib(), base_gib=base, seconds=secs, loss=loss)
    if impl == "trl":
        try:
            import trl

            out["trl"] = trl.__version__
        except ImportError:
            out["trl"] = None
    return out


def predict(points, total):
    """Linear fit of peak memory in T through the last two measured points (one: proportional)."""
    if not points:
        return 0.0
    if len(points) == 1:
        (t0, p0), = points
        return p0 * total / t0
    (t0, p0), (t1, p1) = points[-2:]
    slope = (p1 - p0) / (t1 - t0)
    return p1 + slope * (total - t1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", nargs=2, metavar=("IMPL", "TOKENS"))
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    ap.add_argument("--limit-gib", type=float, default=24.0, help="the budget a series must stay under")
    ap.add_argument("--run-limit-gib", type=float, default=14.0, help="the most a point may take on this machine")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--out", default=os.path.join("bench-results", "long_context_cpu.json"),
                    help="results JSON (and its .png beside it); bench/results/ holds the committed figures")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]))), flush=True)
        return

    rows = []
    for impl in args.impls.split(","):
        points = []
        for total in map(int, args.lengths.split(",")):
            guess = predict(points, total)
            if guess > min(args.limit_gib, args.run_limit_gib):
                why = "over_limit" if guess > args.limit_gib else "not_run_here"
                rows.append(dict(impl=impl, tokens=total, predicted_gib=guess, status=why))
                print(f"{impl:6s} {total:6d}: predicted {guess:6.1f} GiB -> {why}", flush=True)
                continue
            cmd = [sys.executable, os.path.abspath(__file__), "--one", impl, str(total)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                rows.append(dict(impl=impl, tokens=total, status="timeout"))
                print(f"{impl:6s} {total:6d}: timeout", flush=True)
                break
            if proc.returncode != 0:
                rows.append(dict(impl=impl, tokens=total, status=f"failed rc={proc.returncode}",
                                 error=proc.stderr[-400:]))
                print(f"{impl:6s} {total:6d}: failed\n{proc.stderr[-2000:]}", flush=True)
                break
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r["status"] = "measured"
            rows.append(r)
            points.append((total, r["peak_gib"]))
            print(f"{impl:6s} {total:6d}: peak {r['peak_gib']:6.2f} GiB (before the step {r['base_gib']:.2f}), "
                  f"{r['seconds']:.1f} s, loss {r['loss']:.4f}", flush=True)
    meta = dict(machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                threads=int(os.environ.get("BENCH_THREADS", "2")), vocab=VOCAB,
                model="Qwen2-shaped, d=128, 2 layers, 4 heads (2 kv), float32, sdpa, gradient checkpointing",
                limit_gib=args.limit_gib, run_limit_gib=args.run_limit_gib,
                date=time.strftime("%Y-%m-%d"))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    plot(rows, meta, args.out.replace(".json", ".png"))
    print(f"wrote {args.out}")


def plot(rows, meta, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    names = {"gro": "gro_kernels (GROTrainer)", "plain": "plain HF: logits -> log_softmax", "trl": "TRL selective_log_softmax"}
    for impl, color in zip(IMPLS, ("tab:green", "tab:red", "tab:blue")):
        meas = [(r["tokens"], r["peak_gib"]) for r in rows if r["impl"] == impl and r["status"] == "measured"]
        pred = [(r["tokens"], r["predicted_gib"]) for r in rows if r["impl"] == impl and "predicted_gib" in r]
        if meas:
            ax.plot(*zip(*meas), "o-", color=color, label=names[impl])
        if pred:
            line = meas[-1:] + pred
            ax.plot(*zip(*line), "x--", color=color, alpha=0.6,
                    label=f"{names[impl]}: predicted, not run" if not meas else None)
    ax.axhline(meta["limit_gib"], color="gray", lw=1, ls=":")
    ax.text(2048, meta["limit_gib"] * 1.05, f"{meta['limit_gib']:.0f} GiB", color="gray", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens per step (2 sequences)")
    ax.set_ylabel("peak resident memory of one step (GiB)")
    ax.set_title(f"One training step, V={VOCAB}, CPU (dashed: predicted, not run)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(HERE))
    main()
