"""ZeRO-3 gathers whole transformer blocks: the block types are found in any LLaVA; the
bucket sizes are those HF's Trainer gives LLaVA's DeepSpeed configs."""

import multiprocessing
import os

import pytest
import torch
import torch.distributed as dist
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    TrainingArguments,
)
from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config
from transformers.models.clip.modeling_clip import CLIPEncoderLayer
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from medvl.model.build import build_tiny
from medvl.train.config import TrainConfig
from medvl.train.model import build_model
from medvl.train.zero import (
    block_classes,
    deepspeed_config,
    initialize,
    zero3_live_limits,
    zero_buckets,
)


def test_block_classes_are_the_llm_and_vision_layers(bpe_tokenizer):
    assert block_classes(build_tiny(bpe_tokenizer)) == [CLIPEncoderLayer, LlamaDecoderLayer]


def test_deepspeed_config_follows_the_recipe():
    cfg = TrainConfig(zero_stage=3, batch_size=16, grad_accum=2, num_workers=8, bf16=True, use_gpu=True)
    ds = deepspeed_config(cfg)
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 16 * 2 * 8
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["overlap_comm"]
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    # Not LLaVA's 1e9: the optimizer step's fp32 gradient copy is one sub-group (60 MB at 13B, not 5.6 GiB).
    assert ds["zero_optimization"]["sub_group_size"] == 10**7
    assert ds["bf16"]["enabled"] and ds["gradient_clipping"] == 1.0
    assert ds["zero_force_ds_cpu_optimizer"] is False  # a torch optimizer: nothing JIT-compiled
    cpu = deepspeed_config(TrainConfig(zero_stage=2, use_gpu=False))
    assert cpu["zero_optimization"]["stage"] == 2 and not cpu["zero_optimization"]["overlap_comm"]
    assert "stage3_gather_16bit_weights_on_model_save" not in cpu["zero_optimization"]
    assert not cpu["bf16"]["enabled"]


# The "zero_optimization" sections of LLaVA's scripts/zero2.json and zero3.json (Qilin-Med-VL
# launches stage 1 with the first, stage 2 with the second).
LLAVA_ZERO = {
    2: {"stage": 2, "overlap_comm": True, "contiguous_gradients": True, "sub_group_size": 1e9,
        "reduce_bucket_size": "auto"},
    3: {"stage": 3, "overlap_comm": True, "contiguous_gradients": True, "sub_group_size": 1e9,
        "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 1e9,
        "stage3_max_reuse_distance": 1e9, "stage3_gather_16bit_weights_on_model_save": True},
}


def transformers_fill(model, stage: int, tmp) -> dict:
    """What HF's Trainer puts in place of LLaVA's "auto" bucket sizes for ``model``."""
    auto = [k for k, v in LLAVA_ZERO[stage].items() if v == "auto"]
    hf = HfTrainerDeepSpeedConfig({"zero_optimization": dict(LLAVA_ZERO[stage])})
    try:
        hf.trainer_config_finalize(TrainingArguments(output_dir=str(tmp), report_to=[]), model, 100)
        return {k: hf.config["zero_optimization"][k] for k in auto}
    finally:
        del hf
        unset_hf_deepspeed_config()  # it registers itself globally (zero3 detection)


def llava_13b():
    """Qilin-Med-VL's shapes (CLIP ViT-L/14-336 + Llama-2-13B), on the meta device: no memory."""
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=336, patch_size=14)
    text = LlamaConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, vocab_size=32002)
    with torch.device("meta"):
        return LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text))


def test_zero3_keeps_three_blocks_live_at_every_size(bpe_tokenizer):
    """LLaVA's 1e9 live elements at 13B; the same 3 blocks at the rehearsal's size, where 1e9
    kept the whole model gathered."""
    assert zero3_live_limits(llava_13b().config)["stage3_max_live_parameters"] == pytest.approx(1e9, rel=0.05)
    tiny = build_tiny(bpe_tokenizer)
    block = sum(p.numel() for p in tiny.model.language_model.layers[0].parameters())
    limits = zero3_live_limits(tiny.config)
    assert limits["stage3_max_live_parameters"] == limits["stage3_max_reuse_distance"]
    assert limits["stage3_max_live_parameters"] == pytest.approx(3 * block, rel=0.05)


@pytest.mark.parametrize("stage", [2, 3])
def test_buckets_are_what_transformers_fills_for_llava(stage, bpe_tokenizer, tmp_path):
    for model in (llava_13b(), build_tiny(bpe_tokenizer)):
        hf = transformers_fill(model, stage, tmp_path)
        assert zero_buckets(model.config, stage) == hf
    assert hf["reduce_bucket_size"] == 128 * 128  # the tiny LLM's hidden size, not the vision tower's


def _engine_buckets(stage: int, tokenizer: str, tmp: str, out) -> None:
    """A 1-rank gloo DeepSpeed engine made by ``initialize``: the bucket sizes it runs with."""
    torch.set_num_threads(1)
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg{stage}", rank=0, world_size=1)
    cfg = TrainConfig(stage=2, tokenizer=tokenizer, zero_stage=stage, batch_size=1, num_workers=1)
    model, _ = build_model(cfg)
    engine = initialize(model, torch.optim.SGD(model.parameters(), lr=0.0), None, deepspeed_config(cfg))
    live = {"reduce_bucket_size": engine.zero_reduce_bucket_size()}
    if stage == 3:
        live |= {"stage3_prefetch_bucket_size": engine.zero_prefetch_bucket_size(),
                 "stage3_param_persistence_threshold": engine.zero_param_persistence_threshold()}
    out.put(live)
    dist.destroy_process_group()


@pytest.mark.parametrize("stage", [2, 3])
def test_the_engine_runs_with_transformers_buckets(stage, demo_dir, bpe_tokenizer, tmp_path):
    """The values reach DeepSpeed: ``initialize`` on the training path's model."""
    ctx = multiprocessing.get_context("fork")  # a process group of its own, this process's imports
    out = ctx.Queue()
    proc = ctx.Process(target=_engine_buckets, args=(stage, str(demo_dir / "tokenizer"), str(tmp_path), out))
    proc.start()
    live = out.get(timeout=300)
    proc.join(timeout=60)
    assert live == transformers_fill(build_tiny(bpe_tokenizer), stage, tmp_path)
