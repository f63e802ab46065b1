"""One rank of the two-process DDP check in test_integration_trl.py (run by torch.distributed.run).

Trains TRL's GRPOTrainer, then GROGRPOTrainer, from the same checkpoint and seed on 2 CPU processes
(gloo); rank 0 writes both runs' parameters and logs to the output folder."""
import os
import sys

import torch

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from gro_kernels.integrations.trl import GROGRPOTrainer  # noqa: E402
from trl_fixtures import build_tokenizer  # noqa: E402


def reward_len(completions, **kwargs):
    return [len(c) / 8 for c in completions]


def main(model_path, out, loss_type):
    results = {}
    for cls in (GRPOTrainer, GROGRPOTrainer):
        args = GRPOConfig(output_dir=os.path.join(out, cls.__name__), per_device_train_batch_size=4,
                          num_generations=4, max_completion_length=6, use_cpu=True, bf16=False, report_to=[],
                          save_strategy="no", logging_steps=1, seed=0, learning_rate=1e-2, max_steps=2,
                          gradient_accumulation_steps=2, steps_per_generation=4, loss_type=loss_type, beta=0.04)
        trainer = cls(model=model_path, reward_funcs=reward_len, args=args, processing_class=build_tokenizer(),
                      train_dataset=Dataset.from_dict({"prompt": [f"{i}{i + 1}>" for i in range(16)]}))
        assert trainer.accelerator.num_processes == 2
        trainer.train()
        results[cls.__name__] = dict(params={n: p.detach().clone() for n, p in trainer.model.named_parameters()},
                                     log=trainer.state.log_history)
    if int(os.environ["RANK"]) == 0:
        torch.save(results, os.path.join(out, "results.pt"))


if __name__ == "__main__":
    main(*sys.argv[1:])
