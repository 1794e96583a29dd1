"""The GPU benchmark's MFU rests on its FLOP formula: check it against torch's own count."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlavaForConditionalGeneration

from benchmarks import gpu_mfu
from medvl.model.build import llava_config
from medvl.train.batching import collate, model_inputs
from medvl.train.config import TrainConfig
from medvl.train.optim import trainable_groups


@pytest.mark.parametrize("stage", [1, 2])
def test_model_flops_formula_matches_counted_flops(stage):
    """Real widths (ViT-L/14-336, 2048-wide LLM, 32k vocabulary), one layer each to stay fast.
    Eager attention, so the attention matmuls are counted in full, as PaLM's convention does."""
    tok = gpu_mfu.llama2_sized_tokenizer()
    vision, text = gpu_mfu.shapes(smoke=False)
    vision.num_hidden_layers = text.num_hidden_layers = 1
    run = replace(gpu_mfu.RUNS[0], stage=stage, batch=1, seq=1024)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration._from_config(llava_config(vision, text, tok),
                                                       attn_implementation="eager").train()
    trainable_groups(model, TrainConfig(stage=stage))
    rows = gpu_mfu.random_rows(tok, model.config.image_seq_length, vision.image_size, run,
                               np.random.default_rng(0))
    with FlopCounterMode(display=False) as counter:
        model(**model_inputs(collate(rows, tok.pad_token_id, vision.image_size), "cpu")).loss.backward()
    counted = counter.get_total_flops()
    assert gpu_mfu.model_flops(model, run) == pytest.approx(counted, rel=1e-3)  # attention alone is 1.6%
