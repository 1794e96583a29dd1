import torch

from medvl.model.build import TinyPreset, build_tiny, load_hf
from medvl.tokenizer import image_token_id
from medvl.train.export import save_hf


def test_tiny_llava_round_trips_through_hf_format(bpe_tokenizer, tmp_path, s3_endpoint):
    model = build_tiny(bpe_tokenizer)
    cfg = model.config
    assert cfg.vision_feature_layer == -2 and cfg.vision_feature_select_strategy == "default"
    assert cfg.image_token_index == image_token_id(bpe_tokenizer)
    assert cfg.image_seq_length == TinyPreset().num_image_tokens
    assert model.get_input_embeddings().num_embeddings == len(bpe_tokenizer)
    ids = torch.tensor([[1] + [cfg.image_token_index] * cfg.image_seq_length + [5, 6]])
    pixels = torch.randn(1, 3, 32, 32)
    ref = model(input_ids=ids, pixel_values=pixels).logits
    for uri in (str(tmp_path / "hf"), f"{s3_endpoint}/models/tiny"):
        save_hf(model, bpe_tokenizer, uri)
        again = load_hf(uri)
        torch.testing.assert_close(again(input_ids=ids, pixel_values=pixels).logits, ref)
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert "model.safetensors" in files and "processor_config.json" in files
    assert not any(f.endswith(".bin") for f in files)


def test_weights_are_saved_in_the_llava_hf_layout_vllm_loads(bpe_tokenizer, tmp_path):
    """vLLM 0.32 maps llava-hf names (`vision_tower.vision_model.*`, `language_model.model.*`,
    `multi_modal_projector.*`, `language_model.lm_head.*`) and rejects transformers 5.2x's flat
    `vision_tower.embeddings.*`; transformers loads both."""
    from safetensors import safe_open

    save_hf(build_tiny(bpe_tokenizer), bpe_tokenizer, str(tmp_path))
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    prefixes = ("vision_tower.vision_model.", "language_model.model.", "multi_modal_projector.",
                "language_model.lm_head.")
    assert keys and all(k.startswith(prefixes) for k in keys), sorted(keys)[:5]
    assert "vision_tower.vision_model.embeddings.patch_embedding.weight" in keys


def test_processor_loads_in_transformers(bpe_tokenizer, tmp_path):
    from transformers import AutoProcessor

    save_hf(build_tiny(bpe_tokenizer), bpe_tokenizer, str(tmp_path))
    proc = AutoProcessor.from_pretrained(tmp_path)
    assert proc.image_processor.crop_size["height"] == 32
    assert proc.tokenizer.convert_tokens_to_ids("<image>") == image_token_id(bpe_tokenizer)
