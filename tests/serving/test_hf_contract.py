"""An exported model directory on its own in transformers: AutoProcessor + its chat template +
generate give our prompt ids, our pixels and ``medvl serve``'s greedy answer."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from medvl.data.images import ImageSpec, load_image, normalize
from medvl.serving.engine import Engine, Request
from tests.serving.conftest import ANSWER, QUESTION, png_data_uri


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def hf(taught_model_dir):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    return (AutoProcessor.from_pretrained(taught_model_dir),
            LlavaForConditionalGeneration.from_pretrained(taught_model_dir).eval())


def _messages(question: str = QUESTION) -> list[dict]:
    return [{"role": "system", "content": "ignored: the template carries the trained system prompt"},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def test_chat_template_and_processor_give_our_prompt_ids(hf, taught_model_dir):
    processor, _ = hf
    engine = Engine(taught_model_dir)
    png = _png(Image.new("RGB", (40, 30)))
    prompt = processor.apply_chat_template(_messages(), add_generation_prompt=True)
    ids = processor(images=Image.open(io.BytesIO(png)), text=prompt, return_tensors="pt")["input_ids"][0]
    ours = engine.prepare(Request(turns=[(f"<image>\n{QUESTION}", None)], image=png)).ids
    assert ids.tolist() == ours  # image tokens counted right (16 for 16 features), same template
    # A multi-turn conversation renders as training renders it.
    history = [*_messages(), {"role": "assistant", "content": "胸部X线。"},
               {"role": "user", "content": "左侧还是右侧？"}]
    ids = processor(images=Image.open(io.BytesIO(png)), return_tensors="pt",
                    text=processor.apply_chat_template(history, add_generation_prompt=True))["input_ids"][0]
    turns = [(f"<image>\n{QUESTION}", "胸部X线。"), ("左侧还是右侧？", None)]
    assert ids.tolist() == engine.prepare(Request(turns=turns, image=png)).ids


@pytest.mark.parametrize("aspect", ["pad", "crop"])
@pytest.mark.parametrize("size", [(40, 30), (30, 41), (32, 32), (640, 427)])
def test_processor_pixels_are_ours(hf, size, aspect):
    """The saved image processor (pad: LLaVA's expand2square; crop: CLIPImageProcessor's
    truncating resize and centre crop) gives the pixels training and serving use."""
    from medvl.model.build import processor_for

    _, model = hf
    processor = processor_for(model, processor_for(model, hf[0].tokenizer).tokenizer, "v1", aspect)
    rgb = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    png = _png(Image.fromarray(rgb))
    theirs = processor.image_processor(Image.open(io.BytesIO(png)), return_tensors="np")["pixel_values"][0]
    ours = normalize(load_image(png, "x.png", ImageSpec(size=32, aspect=aspect)))
    assert theirs.shape == ours.shape
    levels = np.abs(theirs - ours) * 255 * np.array([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    # crop: exactly CLIP's; pad: our band resampling is at most one level from expand2square's
    assert levels.max() <= (0.01 if aspect == "crop" else 1.01) and levels.mean() < 0.05


def test_generate_answers_as_medvl_serve(hf, taught_model_dir):
    import base64

    processor, model = hf
    png = base64.b64decode(png_data_uri().split(",", 1)[1])
    prompt = processor.apply_chat_template(_messages(), add_generation_prompt=True)
    inputs = processor(images=Image.open(io.BytesIO(png)), text=prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=32, do_sample=False)
    answer = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    engine = Engine(taught_model_dir)
    req = Request(turns=[(f"<image>\n{QUESTION}", None)], image=png, max_tokens=32)
    served = [c.result for step in engine.generate_batch([engine.prepare(req)]) for c in step if c and c.result]
    assert answer == served[0].text == ANSWER
