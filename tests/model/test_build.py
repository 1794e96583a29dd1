import torch

from medvl.model.build import TinyPreset, build_tiny, load_hf, save_hf
from medvl.tokenizer import image_token_id


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


def test_processor_loads_in_transformers(bpe_tokenizer, tmp_path):
    from transformers import AutoProcessor

    save_hf(build_tiny(bpe_tokenizer), bpe_tokenizer, str(tmp_path))
    proc = AutoProcessor.from_pretrained(tmp_path)
    assert proc.image_processor.crop_size["height"] == 32
    assert proc.tokenizer.convert_tokens_to_ids("<image>") == image_token_id(bpe_tokenizer)
