"""GROTrainer on the demo's task, single process or under torchrun (DDP; gloo on CPU, NCCL on GPU).

    python python/examples/train_with_trainer.py --steps 50
    torchrun --nproc_per_node 2 python/examples/train_with_trainer.py --steps 50 --method gro --gold
    torchrun --nproc_per_node 2 python/examples/train_with_trainer.py --steps 50 --fsdp     # FSDP2 instead of DDP
    python python/examples/train_with_trainer.py --model Qwen/Qwen2.5-0.5B-Instruct --steps 10   # a Hub model

Each process samples for its share of the step's prompts; gradients are synchronized by DDP and
normalized over the global batch (see gro_kernels/trainer/distributed.py). Metrics go to
`<out>/metrics.jsonl`, checkpoints (`save_pretrained` + optimizer state) to `<out>/checkpoint-N`;
`--resume <out>/checkpoint-N` continues a run.
"""
import argparse

import torch

from gro_kernels.demo import CharTokenizer, build_model, make_prompts, reversal_reward
from gro_kernels.trainer import GROConfig, GROTrainer, init_distributed
from gro_kernels.trainer.distributed import cleanup


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None, help="Hub model name or path (default: the demo's tiny Llama)")
    p.add_argument("--method", default="grpo")
    p.add_argument("--gold", action="store_true", help="mix the gold answer into each group (offline row)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--out", default="runs/trainer")
    p.add_argument("--resume", default=None)
    p.add_argument("--prompts-per-step", type=int, default=16)
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (fully_shard) instead of DDP")
    args = p.parse_args()
    torch.set_num_threads(1)
    info = init_distributed()

    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tok, model = AutoTokenizer.from_pretrained(args.model), AutoModelForCausalLM.from_pretrained(args.model)
    else:
        tok = CharTokenizer()
        model = build_model(len(tok), seed=0)  # same initialization on every process (DDP also broadcasts)
    cfg = GROConfig(method=args.method, steps=args.steps, num_generations=8, prompts_per_step=args.prompts_per_step,
                    max_new_tokens=3, learning_rate=2e-3, micro_batch_size=72, output_dir=args.out,
                    save_every=args.save_every, offline_column="answer" if args.gold else None,
                    loss_options={"kl_coef": 0.0} if args.method == "grpo" else {}, fsdp=args.fsdp)
    trainer = GROTrainer(model, tok, reward_funcs=[reversal_reward], train_dataset=make_prompts(4096, 3, seed=0),
                         config=cfg)
    if args.resume:
        trainer.load_checkpoint(args.resume)
    history = trainer.train()
    if info.is_main:
        print(f"rank 0 of {info.world_size}: reward {history[0]['reward']:.3f} -> {history[-1]['reward']:.3f}")
    cleanup()


if __name__ == "__main__":
    main()
