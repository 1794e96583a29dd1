"""The model a training worker gets: train mode, recomputation when asked, no KV cache,
the training dtype, and real towers assembled without a random-init copy."""

import pytest
import torch
from transformers import AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel, LlamaConfig

from medvl.model.build import build_from_pretrained
from medvl.tokenizer import image_token_id
from medvl.train.config import TrainConfig
from medvl.train.model import build_model


def _batch(model, tok, rows: int = 2) -> dict[str, torch.Tensor]:
    n = model.config.image_seq_length
    ids = torch.tensor([[tok.bos_token_id or 1] + [image_token_id(tok)] * n + [5, 6, 7]] * rows)
    size = model.config.vision_config.image_size
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
            "pixel_values": torch.randn(rows, 3, size, size, dtype=model.dtype)}


def _attention_calls(model, batch) -> tuple[int, object]:
    """Calls of the LLM's attention modules over one forward + backward, and the output."""
    calls = []
    layers = model.model.language_model.layers
    hooks = [layer.self_attn.register_forward_hook(lambda *_: calls.append(1)) for layer in layers]
    out = model(**batch)
    out.loss.backward()
    for h in hooks:
        h.remove()
    return len(calls), out


@pytest.mark.parametrize("stage", [1, 2])
def test_gradient_checkpointing_recomputes_layers_and_builds_no_cache(demo_dir, stage):
    tokenizer = str(demo_dir / "tokenizer")
    model, tok = build_model(TrainConfig(stage=stage, tokenizer=tokenizer, gradient_checkpointing=True))
    assert model.training and model.model.language_model.training
    for p in model.parameters():  # stage 1: only the projector learns, the LLM still recomputes
        p.requires_grad = stage == 2 or p in set(model.model.multi_modal_projector.parameters())
    calls, out = _attention_calls(model, _batch(model, tok))
    layers = len(model.model.language_model.layers)
    assert calls == 2 * layers, "each decoder layer runs again in backward"
    assert out.past_key_values is None

    plain, tok = build_model(TrainConfig(stage=stage, tokenizer=tokenizer, gradient_checkpointing=False))
    calls, out = _attention_calls(plain, _batch(plain, tok))
    assert calls == layers and out.past_key_values is None


def test_training_dtype_follows_bf16(demo_dir):
    model, _ = build_model(TrainConfig(tokenizer=str(demo_dir / "tokenizer"), bf16=True))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def _tiny_towers(root, tok):
    vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=2, image_size=32, patch_size=8))
    llm = AutoModelForCausalLM.from_config(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=len(tok) - 2, max_position_embeddings=256))
    vision.save_pretrained(root / "vit")
    llm.save_pretrained(root / "llm")
    return vision, llm


def test_build_from_pretrained_loads_each_tower_once_in_dtype(bpe_tokenizer, tmp_path, s3_endpoint):
    from medvl import storage

    vision, llm = _tiny_towers(tmp_path, bpe_tokenizer)
    storage.copy_dir(str(tmp_path / "llm"), f"{s3_endpoint}/towers/llm")
    model = build_from_pretrained(str(tmp_path / "vit"), f"{s3_endpoint}/towers/llm", bpe_tokenizer,
                                  dtype=torch.bfloat16)
    params = dict(model.named_parameters())
    assert not any(p.is_meta for p in params.values())
    assert {p.dtype for p in params.values()} == {torch.bfloat16}
    for name, p in vision.named_parameters():
        assert torch.equal(params[f"model.vision_tower.{name}"], p.to(torch.bfloat16)), name
    for name, p in llm.model.named_parameters():
        if "embed_tokens" not in name:  # resized for <image> and <pad>
            assert torch.equal(params[f"model.language_model.{name}"], p.to(torch.bfloat16)), name
    old = llm.config.vocab_size
    assert torch.equal(params["model.language_model.embed_tokens.weight"][:old],
                       llm.model.embed_tokens.weight.to(torch.bfloat16))
    assert model.get_input_embeddings().num_embeddings == len(bpe_tokenizer)
    ids = torch.tensor([[1] + [image_token_id(bpe_tokenizer)] * 16 + [5]])
    logits = model(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32, dtype=torch.bfloat16)).logits
    assert torch.isfinite(logits.float()).all()
