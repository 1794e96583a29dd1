"""DeepSpeed, kept apart from the model and the loop: the ZeRO config and engine set-up.

On CPU nothing is JIT-compiled: a plain torch optimizer replaces DeepSpeed's fused CPU
Adam (``zero_force_ds_cpu_optimizer: false``), and the shared-memory comm op build is
skipped, so the first step comes in seconds instead of minutes.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import torch

from medvl.train.config import TrainConfig


def deepspeed_config(cfg: TrainConfig) -> dict:
    """The recipe's DeepSpeed config; ``initialize`` adds the buckets sized by the model
    (``zero_buckets``). Overlapping reduction with backward needs CUDA streams (on CPU it
    only adds bookkeeping)."""
    zero: dict = {"stage": cfg.zero_stage, "overlap_comm": cfg.use_gpu, "contiguous_gradients": True,
                  "allgather_bucket_size": 5e8}
    if cfg.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        zero["sub_group_size"] = cfg.zero_sub_group_size  # see TrainConfig
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.global_batch,
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.bf16},
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def zero_buckets(model_config, stage: int) -> dict:
    """The sizes LLaVA's zero2.json / zero3.json leave "auto", as HF's Trainer fills them from
    the LLM's hidden size h (``trainer_config_finalize``): gradients reduced in buckets of h²
    elements (not fixed 5e8-element buffers, 2 GB each in fp32, for a 31.5M-parameter
    projector); under ZeRO-3, 0.9·h² elements prefetched and parameters under 10·h elements
    (norms, biases) kept whole on every rank instead of gathered at each use."""
    h = getattr(model_config, "text_config", model_config).hidden_size
    sizes = {"reduce_bucket_size": h * h}
    if stage == 3:
        sizes |= {"stage3_prefetch_bucket_size": int(0.9 * h * h), "stage3_param_persistence_threshold": 10 * h}
    return sizes


def zero3_live_limits(model_config) -> dict:
    """How many gathered parameter elements ZeRO-3 may keep live, and how soon a parameter
    must be used again to stay gathered: LLaVA's 1e9 elements (zero3.json, DeepSpeed's
    default) is 3 Llama-2-13B decoder blocks; 3 blocks at every size. At a smaller size 1e9
    keeps the whole model gathered from the second step on (measured: +1.2 W on the 0.23B
    rehearsal's worker, benchmarks/memory.py), so the rehearsal would not show a 13B run."""
    text = getattr(model_config, "text_config", model_config)
    h, i = text.hidden_size, text.intermediate_size
    live = 3 * (4 * h * h + 3 * h * i)
    return {"stage3_max_live_parameters": live, "stage3_max_reuse_distance": live}


@contextlib.contextmanager
def partitioned_loading(ds_config: dict) -> Iterator[None]:
    """Under ZeRO-3, HF ``from_pretrained`` calls inside this block build every module
    already partitioned (``zero.Init``) and fill it one module at a time, rank 0 reading
    the checkpoint and the other ranks receiving only their partition: no worker ever
    holds a full copy of the LLM (8 full bf16 copies of a 13B model per node otherwise).
    Other stages load normally: each worker needs the full weights there anyway.
    """
    if ds_config["zero_optimization"]["stage"] != 3:
        yield
        return
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        _skip_cpu_op_builds()
    # zero.Init sizes partitions by DeepSpeed's own world size: attach DeepSpeed's comm
    # layer to the process group Ray Train made (as deepspeed.initialize does later).
    deepspeed.init_distributed(dist_init_required=False)
    hf_ds = HfDeepSpeedConfig(ds_config)  # transformers keeps only a weak reference to it
    try:
        yield
    finally:
        del hf_ds
        unset_hf_deepspeed_config()


def _skip_cpu_op_builds() -> None:
    import deepspeed  # noqa: F401 - registers deepspeed.comm.torch

    # `import deepspeed.comm.torch as m` would bind the wrong object; use sys.modules.
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def block_classes(model: torch.nn.Module) -> list[type]:
    """The transformer block types: the element type of every ``layers`` ModuleList (the
    LLM's decoder layers, the vision tower's encoder layers)."""
    found = {type(m[0]) for name, m in model.named_modules()
             if name.split(".")[-1] == "layers" and isinstance(m, torch.nn.ModuleList) and len(m)}
    return sorted(found, key=lambda c: c.__name__)


def initialize(model: torch.nn.Module, optimizer, scheduler, ds_config: dict):
    """A DeepSpeed engine on the process group Ray Train already created (gloo or NCCL).

    Under ZeRO-3 every transformer block is a "leaf": its parameters are gathered once per
    block instead of once per linear layer, which cuts ZeRO-3's per-module hooks and
    collectives about eightfold (measured: 10% off the CPU step, see benchmarks/train.py).
    Bucket sizes and live-parameter limits ``ds_config`` leaves out come from the model
    (``zero_buckets``, ``zero3_live_limits``).
    """
    import deepspeed

    zero = ds_config["zero_optimization"]
    sizes = zero_buckets(model.config, zero["stage"]) | (zero3_live_limits(model.config) if zero["stage"] == 3 else {})
    ds_config = {**ds_config, "zero_optimization": {**sizes, **zero}}

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        _skip_cpu_op_builds()
    if ds_config["zero_optimization"]["stage"] == 3:
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, block_classes(model))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                      config=ds_config, dist_init_required=False)
    return engine
