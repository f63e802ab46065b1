"""Layer 4: a thin trainer around `gro_loss` for any Hugging Face causal LM.

    from gro_kernels.trainer import GROConfig, GROTrainer
    trainer = GROTrainer(model, tokenizer, reward_funcs=[my_reward], train_dataset=rows,
                         config=GROConfig(method="grpo", num_generations=8))
    trainer.train()
"""
from .config import GROConfig
from .distributed import init_distributed
from .heads import check_head, fold_scale, logit_scale
from .offline import offline_batch
from .rollout import Batch, collate, generate, score
from .trainer import GROTrainer, PolicyLoss, final_hidden, lm_head, load_model, pick_attn_implementation

__all__ = ["Batch", "GROConfig", "GROTrainer", "PolicyLoss", "check_head", "collate", "final_hidden", "fold_scale",
           "generate", "logit_scale",
           "init_distributed", "lm_head", "load_model", "offline_batch", "pick_attn_implementation", "score"]
