"""ZeRO-3 gathers whole transformer blocks: the block types are found in any LLaVA."""

from transformers.models.clip.modeling_clip import CLIPEncoderLayer
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from medvl.model.build import build_tiny
from medvl.train.zero import block_classes


def test_block_classes_are_the_llm_and_vision_layers(bpe_tokenizer):
    assert block_classes(build_tiny(bpe_tokenizer)) == [CLIPEncoderLayer, LlamaDecoderLayer]
