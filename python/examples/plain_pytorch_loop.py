"""gro_loss in a plain PyTorch loop with a Hugging Face causal LM (no trainer class).

    python python/examples/plain_pytorch_loop.py [--model NAME_OR_PATH] [--method grpo] [--steps 100]

Without --model it builds a tiny Llama from a config (no download) and a toy task: answer a
prompt of digits with the same digits reversed, reward = fraction of positions right. The loop:

    sample K completions per prompt -> score -> hidden = model.model(...).last_hidden_state
    -> gro_loss(hidden, model.lm_head.weight, targets, rewards=..., group_ids=...) -> backward -> step

The full [tokens, vocab] logits are never built: gro_loss projects the hidden states itself.
Every 10 steps it prints the mean sampled reward of those steps and the policy's entropy; on the
tiny model the reward climbs from ~0.08 (chance) to ~0.4 in 100 steps (about 10 s on a CPU). The
loss value is not printed: on-policy GRPO's loss is ~0 by construction (importance ratio 1,
advantages centred in each group), while its gradient is not.
"""
import argparse
import random

import torch

from gro_kernels.loss import gro_loss
from gro_kernels.objective.inputs import read_inputs


def reward_fn(completions, answers):
    return [sum(a == b for a, b in zip(c, t)) / max(len(t), len(c), 1) for c, t in zip(completions, answers)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None, help="HF model name or path (default: a tiny Llama from a config)")
    p.add_argument("--method", default="grpo")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    args = p.parse_args()
    torch.manual_seed(0)
    random.seed(0)

    from transformers import AutoModelForCausalLM

    if args.model:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model)
        encode = lambda s: tok(s, add_special_tokens=True).input_ids  # noqa: E731
        decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
        pad, eos = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id, tok.eos_token_id
    else:
        from gro_kernels.demo import CharTokenizer, build_model

        tok = CharTokenizer()
        model = build_model(len(tok), seed=0)
        encode, decode = tok.encode, tok.decode
        pad, eos = tok.pad_token_id, tok.eos_token_id

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    backbone, head = model.get_decoder(), model.get_output_embeddings()
    history = []
    for step in range(args.steps):
        digits = ["".join(random.choice("0123456789") for _ in range(3)) for _ in range(args.prompts)]
        prompts = [torch.tensor(encode(d + ">")) for d in digits]
        P = max(len(x) for x in prompts)
        # left-pad the prompts, repeat each K times, sample
        ids = torch.full((len(prompts), P), pad)
        am = torch.zeros_like(ids)
        for i, x in enumerate(prompts):
            ids[i, P - len(x):], am[i, P - len(x):] = x, 1
        ids, am = ids.repeat_interleave(args.k, 0), am.repeat_interleave(args.k, 0)
        model.eval()
        with torch.no_grad():
            seq = model.generate(input_ids=ids, attention_mask=am, do_sample=True, temperature=1.0, top_k=0,
                                 max_new_tokens=3, pad_token_id=pad, eos_token_id=eos)
        model.train()
        comp = seq[:, P:]
        # completion mask: up to and including the first EOS
        done_before = (comp == eos).cumsum(1) - (comp == eos).long() > 0
        comp_mask = ~done_before
        texts = [decode([t for t, m in zip(row.tolist(), mrow.tolist()) if m and t != eos])
                 for row, mrow in zip(comp, comp_mask)]
        rewards = torch.tensor(reward_fn(texts, [d[::-1] for d in digits for _ in range(args.k)]))
        group_ids = torch.arange(len(prompts)).repeat_interleave(args.k)

        attn = torch.cat([am, comp_mask.long()], 1)
        pos = (attn.cumsum(1) - 1).clamp(min=0)
        hidden = backbone(input_ids=seq, attention_mask=attn, position_ids=pos).last_hidden_state
        hidden = hidden[:, P - 1:-1]                     # the states that predict the completion tokens
        targets = comp.masked_fill(~comp_mask, -100)     # -100: not a response token
        # group_ids only where --method reads them (rloo, grpo: yes; reinforce: no, and it would be refused)
        inputs = read_inputs(args.method, dict(rewards=rewards, group_ids=group_ids,
                                               kl_coef=0.0))  # grpo's default KL needs ref_logp; off here
        out = gro_loss(hidden, head.weight, targets, method=args.method,
                       return_entropy=True, **inputs)    # out.metrics["entropy"]: the policy's mean entropy
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        history.append(rewards.mean().item())
        if (step + 1) % 10 == 0 or step + 1 == args.steps:
            recent = history[-10:]
            print(f"step {step + 1:4d}  reward {sum(recent) / len(recent):.3f} (mean of the last {len(recent)} steps)  "
                  f"entropy {out.metrics['entropy'].item():.3f}", flush=True)
    first, last = history[:10], history[-10:]
    print(f"reward: first {len(first)} steps {sum(first) / len(first):.3f} -> last {len(last)} steps "
          f"{sum(last) / len(last):.3f}")


if __name__ == "__main__":
    main()
