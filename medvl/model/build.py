"""Build the model: plain HF ``LlavaForConditionalGeneration``, so checkpoints open in
transformers and vLLM unchanged.

Two ways in: from a vision-tower directory and an LLM directory (real weights, local or
``s3://``), or from a tiny preset (random init, built from configs) for tests and the CPU
demo, since no weights can be downloaded here. Either way the vision feature layer is -2
with CLS dropped (Qilin-Med-VL / LLaVA-1.5), the projector is ``mlp2x_gelu``, and the
``<image>`` and pad tokens are added to the tokenizer and the embeddings.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessorPil,
    LlavaProcessor,
    PreTrainedTokenizerBase,
)
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from medvl import storage
from medvl.data import templates
from medvl.data.images import CLIP_MEAN, CLIP_STD
from medvl.tokenizer import image_token_id


@dataclass(frozen=True)
class TinyPreset:
    """Shapes of a random-init model small enough to train on 2 CPU cores."""

    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 2
    text_hidden: int = 128
    text_layers: int = 2
    heads: int = 4

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def llava_config(vision: CLIPVisionConfig, text, tok: PreTrainedTokenizerBase) -> LlavaConfig:
    num_tokens = (vision.image_size // vision.patch_size) ** 2
    text.vocab_size = len(tok)
    text.pad_token_id = tok.pad_token_id
    text.bos_token_id, text.eos_token_id = tok.bos_token_id, tok.eos_token_id
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=image_token_id(tok),
        image_seq_length=num_tokens, projector_hidden_act="gelu",
        vision_feature_select_strategy="default", vision_feature_layer=-2,
    )


def build_tiny(tok: PreTrainedTokenizerBase, preset: TinyPreset = TinyPreset(), seed: int = 0
               ) -> LlavaForConditionalGeneration:
    """A random-init LLaVA (CLIP ViT + mlp2x_gelu + Llama) sized by ``preset``."""
    vision = CLIPVisionConfig(
        hidden_size=preset.vision_hidden, intermediate_size=2 * preset.vision_hidden,
        num_hidden_layers=preset.vision_layers, num_attention_heads=preset.heads,
        image_size=preset.image_size, patch_size=preset.patch_size, projection_dim=preset.vision_hidden,
    )
    text = LlamaConfig(
        hidden_size=preset.text_hidden, intermediate_size=2 * preset.text_hidden,
        num_hidden_layers=preset.text_layers, num_attention_heads=preset.heads,
        num_key_value_heads=preset.heads, max_position_embeddings=1024,
    )
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(llava_config(vision, text, tok)).eval()


def build_from_pretrained(vision_uri: str, llm_uri: str, tok: PreTrainedTokenizerBase,
                          dtype: torch.dtype = torch.float32,
                          loading: contextlib.AbstractContextManager | None = None) -> LlavaForConditionalGeneration:
    """Real weights: a CLIP vision tower + a Llama/Qwen2 LLM, a fresh projector between them.

    Each tower is loaded once, straight into ``dtype``; the LLaVA shell around them is built
    on the meta device, so no random-init copy of a 13B LLM is ever materialised (that
    copy alone was 52 GB of host RAM per worker in fp32). ``loading`` wraps the two
    ``from_pretrained`` calls and the resize only (``zero.partitioned_loading`` under ZeRO-3):
    a model *constructed* inside it would be partitioned before its weights are initialised.
    """
    with storage.local_dir(vision_uri) as vision_dir, storage.local_dir(llm_uri) as llm_dir:
        vision_cfg = AutoConfig.from_pretrained(vision_dir)
        vision_cfg = getattr(vision_cfg, "vision_config", vision_cfg)  # full CLIP dir or vision-only
        config = llava_config(vision_cfg, AutoConfig.from_pretrained(llm_dir), tok)
        with torch.device("meta"):
            model = LlavaForConditionalGeneration(config)
        with loading or contextlib.nullcontext():
            vision = CLIPVisionModel.from_pretrained(vision_dir, config=vision_cfg, dtype=dtype)
            llm = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=dtype)
            llm.resize_token_embeddings(len(tok))
    model.model.vision_tower = vision
    model.model.language_model = llm.model
    model.lm_head = llm.lm_head
    model.model.multi_modal_projector = LlavaMultiModalProjector(config).to(dtype)
    return model


def processor_for(model: LlavaForConditionalGeneration, tok: PreTrainedTokenizerBase, template: str = "v1",
                  aspect: str = "pad") -> LlavaProcessor:
    """The HF processor saved beside the weights, so transformers and vLLM alone prepare inputs
    as we do: our pixels (``pad``: expanded to a square of the CLIP mean colour, LLaVA's
    expand2square; ``crop``: CLIPImageProcessor's resize + centre crop), one image token per
    patch (CLS dropped: ``num_additional_image_tokens=1`` with the ``default`` strategy) and the
    conversation template as a chat template (on the tokenizer too)."""
    vision = model.config.vision_config
    size = vision.image_size
    image_processor = LlavaImageProcessorPil(
        do_pad=aspect == "pad", size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
    )
    chat = templates.chat_template(templates.get(template))
    tok.chat_template = chat
    return LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=vision.patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=chat)


# The weight names of the llava-hf checkpoints on the Hub, the layout every reader loads:
# transformers 4.x and 5.x (5.x maps it onto its own module names) and vLLM, which wants
# `vision_tower.vision_model.*` and fails on the flat `vision_tower.embeddings.*` that
# transformers 5.2x's own save_pretrained writes ("no module or parameter named ...").
_CHECKPOINT_PREFIXES = (
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.language_model.", "language_model.model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "language_model.lm_head."),
)


def checkpoint_key(name: str) -> str:
    """A ``LlavaForConditionalGeneration`` parameter name (transformers 4 or 5) as llava-hf
    checkpoints spell it."""
    for ours, theirs in _CHECKPOINT_PREFIXES:
        if name.startswith(ours):
            rest = name[len(ours):]
            if theirs.endswith("vision_model.") and rest.startswith("vision_model."):
                rest = rest[len("vision_model."):]  # transformers 4 names it already
            return theirs + rest
    raise ValueError(f"{name}: not a LlavaForConditionalGeneration parameter")


def load_hf(uri: str, dtype: torch.dtype = torch.float32) -> LlavaForConditionalGeneration:
    """Load an exported model directory (local or ``s3://``) in ``dtype``; safetensors only."""
    with storage.local_dir(uri) as local:
        return LlavaForConditionalGeneration.from_pretrained(local, dtype=dtype, use_safetensors=True).eval()
