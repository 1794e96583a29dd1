"""Original LLaVA layout -> HF Llava: same logits as a forward pass on the original weights."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from medvl.model.build import load_hf
from medvl.model.convert import ConversionError, convert_llava, export_projector

V_HIDDEN, HIDDEN = 48, 64


@pytest.fixture(scope="module")
def original(tmp_path_factory, spm_tokenizer_dir):
    """A tiny checkpoint in the original LLaVA layout: .bin state dict, LLaVA config fields."""
    root = tmp_path_factory.mktemp("orig")
    vit_dir, src = root / "clip", root / "llava"
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=V_HIDDEN, intermediate_size=96, num_hidden_layers=3,
                                     num_attention_heads=4, image_size=32, patch_size=8)).save_pretrained(vit_dir)
    tok = AutoTokenizer.from_pretrained(spm_tokenizer_dir)
    llm_cfg = LlamaConfig(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    state = LlamaForCausalLM(llm_cfg).state_dict()
    state["model.mm_projector.0.weight"] = torch.randn(HIDDEN, V_HIDDEN) * 0.1
    state["model.mm_projector.0.bias"] = torch.randn(HIDDEN) * 0.1
    state["model.mm_projector.2.weight"] = torch.randn(HIDDEN, HIDDEN) * 0.1
    state["model.mm_projector.2.bias"] = torch.randn(HIDDEN) * 0.1
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # old checkpoints have it
    src.mkdir()
    torch.save(state, src / "pytorch_model.bin")
    cfg = {**llm_cfg.to_dict(), "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava",
           "mm_vision_tower": "/not/on/this/machine/clip-vit-large-patch14-336",
           "mm_hidden_size": V_HIDDEN, "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
           "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad", "mm_use_im_start_end": False}
    (src / "config.json").write_text(json.dumps(cfg))
    tok.save_pretrained(src)
    return src, vit_dir, state, llm_cfg


def reference_logits(state, llm_cfg, vit_dir, text_ids, image_pos, pixels):
    """LLaVA's forward written out by hand on the original weights."""
    vit = CLIPVisionModel.from_pretrained(vit_dir).eval()
    feats = vit(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    h = F.gelu(feats @ state["model.mm_projector.0.weight"].T + state["model.mm_projector.0.bias"])
    img = h @ state["model.mm_projector.2.weight"].T + state["model.mm_projector.2.bias"]
    llm = LlamaForCausalLM(llm_cfg).eval()
    llm.load_state_dict({k: v for k, v in state.items() if "mm_projector" not in k and "inv_freq" not in k})
    embeds = llm.model.embed_tokens(text_ids).clone()
    embeds[0, image_pos : image_pos + img.shape[1]] = img[0]
    return llm(inputs_embeds=embeds).logits


def test_converted_model_matches_original_forward(original, tmp_path):
    src, vit_dir, state, llm_cfg = original
    convert_llava(str(src), str(vit_dir), str(tmp_path / "hf"))
    model = load_hf(str(tmp_path / "hf"))
    n_img = model.config.image_seq_length
    torch.manual_seed(1)
    text = torch.randint(3, llm_cfg.vocab_size, (1, 10 + n_img))
    ids = text.clone()
    ids[0, 2 : 2 + n_img] = model.config.image_token_index
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ours = model(input_ids=ids, pixel_values=pixels).logits[..., : llm_cfg.vocab_size]
        ref = reference_logits(state, llm_cfg, vit_dir, text, 2, pixels)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert model.config.vision_feature_layer == -2
    meta = json.loads((tmp_path / "hf" / "medvl.json").read_text())
    assert meta == {"template": "v1", "aspect": "pad", "image_size": 32}

    # The reverse direction: mm_projector.bin that LLaVA's scripts accept.
    export_projector(model, str(tmp_path / "mm_projector.bin"))
    proj = torch.load(tmp_path / "mm_projector.bin", weights_only=True)
    assert set(proj) == {k for k in state if "mm_projector" in k}
    for k, v in proj.items():
        torch.testing.assert_close(v, state[k])


def test_unknown_keys_are_an_error_naming_them(original, tmp_path):
    src, vit_dir, state, _ = original
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    torch.save({**state, "model.mm_resampler.weight": torch.zeros(1)}, bad / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="model.mm_resampler.weight"):
        convert_llava(str(bad), str(vit_dir), str(tmp_path / "out"))
    torch.save({k: v for k, v in state.items() if k != "lm_head.weight"}, bad / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="lm_head.weight"):
        convert_llava(str(bad), str(vit_dir), str(tmp_path / "out"))


def test_converted_model_is_served(original, tmp_path, ray_cluster, s3_endpoint):
    """Everything on S3, as on a cluster: the release and CLIP directories in, the converted
    model out, and the Serve replica loading it from there."""
    import requests
    from ray import serve

    from medvl import storage
    from medvl.serving.api import ServeConfig
    from medvl.serving.app import run_local
    from tests.conftest import free_port
    from tests.serving.conftest import png_data_uri

    src, vit_dir, _, _ = original
    root = f"{s3_endpoint}/convert-{tmp_path.name}"
    storage.copy_dir(str(src), f"{root}/release")
    storage.copy_dir(str(vit_dir), f"{root}/clip")
    convert_llava(f"{root}/release", f"{root}/clip", f"{root}/hf")
    assert storage.exists(f"{root}/hf/config.json") and storage.exists(f"{root}/hf/medvl.json")
    port = free_port()
    run_local(ServeConfig(model=f"{root}/hf", max_tokens_cap=8), port=port, blocking=False,
              options={"ray_actor_options": {"num_cpus": 0.5}})
    try:
        r = requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120, json={
            "model": "medvl", "max_tokens": 4, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": png_data_uri()}},
                {"type": "text", "text": "这是什么检查？"}]}]})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] >= 1
    finally:
        serve.shutdown()
