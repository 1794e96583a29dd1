"""The model the workers export: sharded safetensors in the training dtype, every tensor
equal to the trained weights gathered from the ZeRO-3 checkpoint, loadable by transformers."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from transformers import LlavaForConditionalGeneration

from medvl.model.build import checkpoint_key, load_hf
from medvl.train.checkpoint import CKPT_TAG

INDEX = "model.safetensors.index.json"
pytestmark = pytest.mark.slow


def _final_checkpoint(output: str, name: str) -> str:
    run = os.path.join(output, name)
    return os.path.join(run, max(d for d in os.listdir(run) if d.startswith("checkpoint_")
                                 and os.path.isdir(os.path.join(run, d))))


def test_zero3_export_is_sharded_and_equals_the_gathered_weights(stage1, stage2):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    hf = stage2["hf"]
    with open(os.path.join(hf, INDEX)) as f:
        index = json.load(f)
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1
    exported = {}
    for f in files:
        path = os.path.join(hf, f)
        with safe_open(path, "pt") as st:
            part = {k: st.get_tensor(k) for k in st.keys()}  # noqa: SIM118 - safe_open is no dict
        exported.update(part)
        # within the 1 MB limit (+ the header), unless one tensor alone is larger
        assert os.path.getsize(path) <= 1_000_000 + 16_000 or len(part) == 1, (f, list(part))
    assert set(exported) == set(index["weight_map"])

    # Trainable weights: consolidated from the 2 ranks' ZeRO-3 partitions by DeepSpeed itself.
    ckpt = _final_checkpoint(os.path.dirname(hf), "stage2")
    trained = get_fp32_state_dict_from_zero_checkpoint(ckpt, tag=CKPT_TAG, exclude_frozen_parameters=True)
    assert trained and all("vision_tower" not in k for k in trained)  # frozen: not in the checkpoint
    trained = {checkpoint_key(k): v for k, v in trained.items()}  # files use llava-hf names
    init = {checkpoint_key(k): v for k, v in load_hf(stage1["hf"]).named_parameters()}
    assert set(exported) == set(init)
    for key, tensor in exported.items():
        assert tensor.dtype == torch.float32  # the CPU demo's training dtype
        want = trained.get(key, init[key])
        assert torch.equal(tensor, want.to(tensor.dtype)), key

    model, info = LlavaForConditionalGeneration.from_pretrained(hf, output_loading_info=True)
    assert not any(info.values()), info
    assert model.config.text_config.use_cache  # training turned the cache off; inference wants it back
    with open(os.path.join(hf, "config.json")) as f:  # vLLM picks its model class by this field
        assert json.load(f)["architectures"] == ["LlavaForConditionalGeneration"]
