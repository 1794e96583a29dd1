"""Batched generation: left padding does not change answers; streaming is UTF-8 safe."""

import io

import numpy as np
import pytest
from PIL import Image

from medvl.model.build import build_tiny
from medvl.serving.engine import Engine, IncrementalDecoder, Request, write_meta
from medvl.train.export import save_hf


@pytest.fixture(scope="module")
def engine(bpe_tokenizer, tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("tiny"))
    save_hf(build_tiny(bpe_tokenizer), bpe_tokenizer, uri)
    write_meta(uri, template="v1", aspect="pad", image_size=32)
    return Engine(uri)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_chinese_split_across_byte_tokens_is_never_broken(bpe_tokenizer):
    text = "罕见字：龘靐齉，胸部X线。"  # rare characters fall back to byte tokens
    ids = bpe_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text)  # some characters really are split
    dec = IncrementalDecoder(bpe_tokenizer)
    deltas = [dec.push(i) for i in ids]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def _run(engine, reqs):
    streamed, results = [""] * len(reqs), [None] * len(reqs)
    for step in engine.generate_batch([engine.prepare(r) for r in reqs]):
        for i, chunk in enumerate(step):
            if chunk is not None:
                streamed[i] += chunk.delta
                results[i] = chunk.result or results[i]
    return streamed, results


def test_batch_equals_single_and_stream_equals_result(engine):
    a = Request(turns=[("<image>\n这是什么检查？", None)], image=_png(), max_tokens=6)
    b = Request(turns=[("<image>\n这是一张很长的问题，请回答。", None)], image=_png(), max_tokens=3)
    streamed, results = _run(engine, [a, b])
    for s, r, req in zip(streamed, results, [a, b], strict=True):
        assert s == r.text and r.completion_tokens <= req.max_tokens
        assert r.finish_reason in ("stop", "length") and r.prompt_tokens > 16
    alone, alone_results = _run(engine, [a])
    assert alone[0] == streamed[0] and alone_results[0].completion_tokens == results[0].completion_tokens


def test_text_only_and_image_requests_share_a_batch(engine):
    a = Request(turns=[("<image>\n这是什么检查？", None)], image=_png(), max_tokens=4)
    b = Request(turns=[("你好", None)], max_tokens=4)
    streamed, results = _run(engine, [b, a])
    assert streamed[1] == _run(engine, [a])[0][0] and all(results)
    assert streamed[0] == _run(engine, [b])[0][0]  # the text-only answer, as when asked alone


def test_seeded_sampling_is_reproducible(engine):
    req = Request(turns=[("<image>\n描述", None)], image=_png(), max_tokens=5, temperature=1.0,
                  top_p=0.9, seed=7)
    assert _run(engine, [req])[0] == _run(engine, [req])[0]


def test_sampling_uses_seed_temperature_and_top_p(engine):
    def ask(**sampling) -> str:
        req = Request(turns=[("<image>\n描述", None)], image=_png(), max_tokens=5, **sampling)
        return _run(engine, [req])[0][0]

    greedy = ask()
    sampled = {ask(temperature=1.0, seed=s) for s in range(4)}
    assert len(sampled) > 1  # the seed is used
    assert sampled != {greedy}  # temperature > 0 samples
    assert ask(temperature=1.0, top_p=1e-6, seed=3) == greedy  # top_p keeps only the top token


def test_one_failing_request_ends_alone_and_extreme_sampling_values_work(engine):
    """A seed no generator takes fails only its own request; a temperature near 1e-38 and a
    top_p below float precision (each raised inside the batch loop, failing every request of
    the batch) decode as the limits they approach: greedy."""
    def req(**kw):
        return Request(turns=[("<image>\n这是什么检查？", None)], image=_png(), max_tokens=6, **kw)

    greedy = _run(engine, [req()])[0][0]
    batch = [req(), req(seed=2**64), req(temperature=1e-38, seed=1), req(temperature=1.0, top_p=1e-46, seed=2)]
    chunks = [[c for c in step] for step in engine.generate_batch([engine.prepare(r) for r in batch])]
    errors = [next((c.error for step in chunks if (c := step[i]) is not None and c.error), None) for i in range(4)]
    assert errors[0] is None and errors[2] is None and errors[3] is None
    assert errors[1] and "seed" in errors[1]
    streamed, results = _run(engine, [batch[0], batch[2], batch[3]])
    assert streamed == [greedy] * 3 and all(results)


def test_a_stop_string_split_across_tokens_never_reaches_the_stream(engine):
    req = Request(turns=[("<image>\n描述", None)], image=_png(), max_tokens=12)
    deltas = [c.delta for step in engine.generate_batch([engine.prepare(req)]) for c in step if c and c.delta]
    k = next(k for k in range(len(deltas) - 1) if deltas[k] and deltas[k + 1])
    stop = deltas[k][-1] + deltas[k + 1][0]  # ends one token's text, begins the next one's
    full = "".join(deltas)
    req.stop = [stop]
    streamed, results = _run(engine, [req])
    assert results[0].finish_reason == "stop" and results[0].text == full[:full.find(stop)]
    assert streamed[0] == results[0].text  # nothing of the stop string was streamed first
