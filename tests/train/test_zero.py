"""ZeRO-3 gathers whole transformer blocks: the block types are found in any LLaVA."""

from transformers.models.clip.modeling_clip import CLIPEncoderLayer
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from medvl.model.build import build_tiny
from medvl.train.zero import block_classes


def test_block_classes_are_the_llm_and_vision_layers(bpe_tokenizer):
    assert block_classes(build_tiny(bpe_tokenizer)) == [CLIPEncoderLayer, LlamaDecoderLayer]


def test_deepspeed_config_follows_the_recipe():
    from medvl.train.config import TrainConfig
    from medvl.train.zero import deepspeed_config

    cfg = TrainConfig(zero_stage=3, batch_size=16, grad_accum=2, num_workers=8, bf16=True, use_gpu=True)
    ds = deepspeed_config(cfg)
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 16 * 2 * 8
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["overlap_comm"]
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    assert ds["bf16"]["enabled"] and ds["gradient_clipping"] == 1.0
    assert ds["zero_force_ds_cpu_optimizer"] is False  # a torch optimizer: nothing JIT-compiled
    cpu = deepspeed_config(TrainConfig(zero_stage=2, use_gpu=False))
    assert cpu["zero_optimization"]["stage"] == 2 and not cpu["zero_optimization"]["overlap_comm"]
    assert "stage3_gather_16bit_weights_on_model_save" not in cpu["zero_optimization"]
    assert not cpu["bf16"]["enabled"]
