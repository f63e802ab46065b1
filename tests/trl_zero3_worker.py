"""One rank of the two-process DeepSpeed ZeRO-3 check in test_zero3.py (run by torch.distributed.run).

For a tiny Llama with an untied and a tied head: TRL's GRPOTrainer and GROGRPOTrainer, TRL's
DPOTrainer and GRODPOTrainer, each trained two steps from the same checkpoint and seed under
accelerate + DeepSpeed ZeRO-3 (CPU accelerator, gloo); then, on the plain DeepSpeed engine, the
head's weight read outside the engine's forward (an empty ZeRO-3 placeholder) is refused. Rank 0
writes the full parameters and logs of every run."""
import importlib
import os
import sys

import torch

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# DeepSpeed's CPU accelerator compiles a shared-memory all-reduce for inference on first use; training
# does not need it (the collectives go through gloo), so the test does not spend a compile on it
importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None

from datasets import Dataset  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param  # noqa: E402
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer  # noqa: E402

from gro_kernels.integrations.trl import GRODPOTrainer, GROGRPOTrainer  # noqa: E402
from trl_fixtures import build_tokenizer  # noqa: E402

# persistence threshold 0: ZeRO-3 keeps parameters below it whole on every rank (1e5 elements by default,
# more than any of the tiny model's), and the test is about partitioned ones
ZERO3 = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
         "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}, "bf16": {"enabled": False}}


def reward_len(completions, **kwargs):
    return [len(c) / 8 for c in completions]


def grpo(cls, model_path, out):
    args = GRPOConfig(output_dir=out, per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
                      use_cpu=True, bf16=False, report_to=[], save_strategy="no", logging_steps=1, seed=0,
                      learning_rate=1e-2, max_steps=2, loss_type="dapo", beta=0.04, deepspeed=ZERO3)
    return cls(model=model_path, reward_funcs=reward_len, args=args, processing_class=build_tokenizer(),
               train_dataset=Dataset.from_dict({"prompt": [f"{i}{i + 1}>" for i in range(16)]}))


def dpo(cls, model_path, out):
    rows = [(f"{i}{i + 1}>", "abc"[: 1 + i % 3] + "d", "hg"[: 1 + i % 2]) for i in range(8)]
    data = Dataset.from_dict({"prompt": [r[0] for r in rows], "chosen": [r[1] for r in rows],
                              "rejected": [r[2] for r in rows]})
    args = DPOConfig(output_dir=out, per_device_train_batch_size=2, use_cpu=True, bf16=False, report_to=[],
                     save_strategy="no", logging_steps=1, seed=0, max_length=16, learning_rate=1e-2, max_steps=2,
                     beta=0.3, deepspeed=ZERO3)
    return cls(model=model_path, args=args, train_dataset=data, processing_class=build_tokenizer())


def main(untied_path, tied_path, out):
    results = {}
    for tie, path in (("untied", untied_path), ("tied", tied_path)):
        for kind, make, classes in (("grpo", grpo, (GRPOTrainer, GROGRPOTrainer)),
                                    ("dpo", dpo, (DPOTrainer, GRODPOTrainer))):
            for cls in classes:
                trainer = make(cls, path, os.path.join(out, f"{tie}-{cls.__name__}"))
                assert trainer.accelerator.num_processes == 2 and trainer.is_deepspeed_enabled
                assert trainer.accelerator.state.deepspeed_plugin.zero_stage == 3
                trainer.train()
                params = {n: safe_get_full_fp32_param(p).clone() for n, p in trainer.model.named_parameters()}
                results[(tie, kind, cls.__name__)] = dict(params=params, log=trainer.state.log_history)
    # the weight read outside the engine's forward is ZeRO-3's empty placeholder: an error saying what to do
    head = trainer.model.get_output_embeddings()
    assert head.weight.numel() == 0  # partitioned: an empty placeholder outside the forward
    from gro_kernels import token_logprobs
    from gro_kernels.integrations.hf_head import _head_weights
    errors = []
    for call in (lambda: _head_weights(trainer.model),
                 lambda: token_logprobs(torch.randn(2, head.weight.ds_shape[1]), head.weight, torch.tensor([1, 2]))):
        try:
            call()
            errors.append(None)
        except ValueError as e:
            errors.append(str(e))
    results["errors"] = errors
    if int(os.environ["RANK"]) == 0:
        torch.save(results, os.path.join(out, "results.pt"))
    import torch.distributed as dist
    trainer = None  # noqa: F841 (the engines go before their process group)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
