"""Batched generation for a LLaVA model: left padding, per-request sampling and stops.

``generate_batch`` is a generator yielding, after every decoding step, one ``Chunk`` per
request (``None`` once a request has finished), so the same loop serves streaming and
non-streaming calls and a Serve batch of both. Deltas are UTF-8 safe: a Chinese
character split across byte-level tokens is held back until it is complete.
"""

from __future__ import annotations

import inspect
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from medvl import storage
from medvl.data import templates
from medvl.data.images import ImageSpec, load_image, normalize
from medvl.data.tokenize import encode_turns
from medvl.model.build import load_hf
from medvl.tokenizer import load as load_tokenizer

META_FILE = "medvl.json"  # template and image settings written beside an exported model
MIN_TEMPERATURE = 1e-4  # sampling below this is greedy decoding
CONCURRENT_BATCHES = 4  # batches of max_batch_size decoding at once on one model replica


@dataclass
class Request:
    turns: list[tuple[str, str | None]]  # last answer None: the turn to generate
    image: bytes | None = None
    image_name: str = "upload"  # "upload.dcm" when the client said DICOM (application/dicom)
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class Prepared:
    """A request with its prompt ids and pixels, validated before it joins a batch."""

    req: Request
    ids: list[int]
    pixels: np.ndarray | None
    cancelled: bool = False  # set when its caller went away: its row leaves the batch


@dataclass
class Result:
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Chunk:
    delta: str
    result: Result | None = None  # set on a request's last chunk
    error: str | None = None  # set instead when this request failed (the others go on)


class IncrementalDecoder:
    """Turn a growing list of token ids into text deltas that never split a character."""

    def __init__(self, tok):
        self.tok = tok
        self.ids: list[int] = []
        self.emitted = ""

    def flush(self) -> str:
        """Whatever is still held back (a sequence cut mid-character ends as U+FFFD)."""
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        delta, self.emitted = text[len(self.emitted):], text
        return delta

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for more bytes
            return ""
        delta, self.emitted = text[len(self.emitted):], text
        return delta


class Preparer:
    """What turns a request into prompt ids and pixels: tokenizer, template, image settings.
    It loads no weights, so the HTTP ingress runs it on a small CPU replica."""

    def __init__(self, model_uri: str):
        from transformers import AutoConfig

        with storage.local_dir(model_uri, weights=False) as local:  # one fetch for both (S3)
            config = AutoConfig.from_pretrained(local)
            self.tok = load_tokenizer(model_uri)  # enters the same cache entry while it is held
        meta = read_meta(model_uri, config.vision_config.image_size)
        self.template = templates.get(meta["template"])
        self.spec = ImageSpec(size=meta["image_size"], aspect=meta["aspect"])
        self.num_image_tokens = config.image_seq_length
        self.image_token_id = config.image_token_index
        end = self.template.answer_end  # the token that closes an answer, besides EOS
        self.stop_ids = {self.tok.eos_token_id} | (
            set(self.tok(end, add_special_tokens=False).input_ids[-1:]) if end else set())

    def prepare(self, req: Request, max_pixels: int = 50_000_000, allow_burned_in: bool = False) -> Prepared:
        """Prompt ids (built by the training code path) and uint8 pixels; ``ImageError`` if bad."""
        ids = encode_turns(req.turns, self.template, self.tok, self.num_image_tokens).input_ids
        pixels = self.pixels(req.image, req.image_name, max_pixels, allow_burned_in) if req.image is not None else None
        return Prepared(req, ids, pixels)

    def pixels(self, data: bytes, name: str, max_pixels: int, allow_burned_in: bool) -> np.ndarray:
        """The image as the model gets it (decoded, DICOM windowed, fitted to its input size):
        uint8 HxWx3. The web page's preview shows this very array; ``ImageError`` if bad."""
        return load_image(data, name, ImageSpec(self.spec.size, self.spec.aspect, max_pixels, allow_burned_in))


class Engine:
    """One model + tokenizer + template, loaded once per Serve replica."""

    def __init__(self, model_uri: str, device: str = "cpu"):
        dtype = torch.float32 if device == "cpu" else torch.bfloat16  # bf16 on GPU, as trained
        self.device = torch.device(device)
        self.model = load_hf(model_uri, dtype=dtype).to(self.device)
        self.preparer = Preparer(model_uri)
        self.prepare = self.preparer.prepare
        self.tok = self.preparer.tok
        self.stop_ids = self.preparer.stop_ids
        # transformers 5.2x calls the KV cache `cache`; the 5.19 that vLLM pins (and the
        # vLLM venv, where the serve benchmark runs this engine too) `past_key_values`.
        self.cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self._lock = threading.Lock()
        self.decoding = 0  # rows decoding now, over all concurrent batches

    def _count(self, n: int) -> None:
        with self._lock:
            self.decoding += n

    @torch.inference_mode()
    def generate_batch(self, batch: list[Prepared]) -> Iterator[list[Chunk | None]]:
        """Decode all requests together, yielding one chunk per unfinished request per step.
        A finished or cancelled request leaves the batch: its row is dropped from the KV
        cache, so the others decode a smaller batch and an abandoned batch ends at once."""
        reqs = [p.req for p in batch]
        ids, mask, pixels = self._collate(batch)
        gens = [_generator(r) for r in reqs]
        decoders = [IncrementalDecoder(self.tok) for _ in reqs]
        done = [False] * len(reqs)
        texts = [""] * len(reqs)
        sent = [0] * len(reqs)  # characters of each text already streamed
        live = list(range(len(reqs)))  # request index of each row still in the batch
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self._count(len(reqs))
        try:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                             pixel_values=pixels, use_cache=True)
            cache, step, logits = getattr(out, self.cache_kw), 0, out.logits[:, -1].float().cpu()
            while True:
                chunks: list[Chunk | None] = [None] * len(reqs)
                token: dict[int, int] = {}
                for row, i in enumerate(live):  # sampling (and its seeded generators) on the CPU
                    t = self._sample_or_error(logits[row], reqs[i], gens[i])
                    if isinstance(t, str):  # this request's sampling failed: it alone ends
                        done[i], chunks[i] = True, Chunk("", error=t)
                        continue
                    delta, reason = self._advance(i, reqs[i], t, decoders[i], texts, sent, step)
                    done[i], token[i] = reason is not None, t
                    chunks[i] = Chunk(delta, Result(texts[i], reason, len(batch[i].ids), step + 1)
                                      if reason else None)
                yield chunks
                step += 1
                keep = [row for row, i in enumerate(live) if not done[i] and not batch[i].cancelled]
                if not keep:
                    return
                if len(keep) < len(live):
                    self._count(len(keep) - len(live))
                    cache.batch_select_indices(torch.tensor(keep, device=self.device))
                    mask, positions, live = mask[keep], positions[keep], [live[row] for row in keep]
                mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
                positions = positions[:, -1:] + 1
                tokens = torch.tensor([token[i] for i in live], device=self.device)[:, None]
                out = self.model(input_ids=tokens, attention_mask=mask, position_ids=positions,
                                 use_cache=True, **{self.cache_kw: cache})
                cache, logits = getattr(out, self.cache_kw), out.logits[:, -1].float().cpu()
        finally:
            self._count(-len(live))

    def _advance(self, i, r: Request, token: int, dec: IncrementalDecoder, texts, sent, step):
        """Append one token to request ``i``; return (delta, finish reason or None). Text that
        could be the start of a stop string is held back until it cannot, so a stop string
        split across tokens never leaks into a stream."""
        stopped, last = token in self.stop_ids, step + 1 >= r.max_tokens
        piece = dec.flush() if stopped else dec.push(token) + (dec.flush() if last else "")
        # The space the template puts before an answer (v1) is not the answer's.
        text = texts[i] + piece if texts[i] else piece.lstrip()
        reason = "stop" if stopped else "length" if last else None
        for stop in r.stop:
            if (cut := text.find(stop)) >= 0:
                text, reason = text[:cut], "stop"
        texts[i] = text
        end = len(text) if reason else len(text) - _held(text, r.stop)
        delta, sent[i] = text[sent[i]:end], max(sent[i], end)
        return delta, reason

    def _sample_or_error(self, logits: torch.Tensor, r: Request, gen: torch.Generator | str) -> int | str:
        """The next token of one request, or why it cannot have one: a failure here ends
        that request, never its batch."""
        try:
            if isinstance(gen, str):
                raise ValueError(gen)
            return self._sample(logits, r, gen)
        except (RuntimeError, ValueError, OverflowError) as e:
            return f"sampling failed: {e}"

    @staticmethod
    def _sample(logits: torch.Tensor, r: Request, gen: torch.Generator) -> int:
        # Below this the distribution is the argmax's to float precision (and 1/T overflows).
        if r.temperature < MIN_TEMPERATURE:
            return int(logits.argmax())
        probs = torch.softmax(logits.double() / r.temperature, dim=-1)
        if r.top_p < 1.0:
            sorted_p, idx = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < r.top_p
            keep[0] = True  # the most likely token, whatever top_p (a tiny one would keep none)
            probs = torch.zeros_like(probs).scatter(0, idx[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=gen))

    def _collate(self, batch: list[Prepared]):
        """Left-pad prompts (generation appends on the right); stack pixels."""
        width = max(len(p.ids) for p in batch)
        pad = self.tok.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p.ids)) + p.ids for p in batch])
        mask = torch.tensor([[0] * (width - len(p.ids)) + [1] * len(p.ids) for p in batch])
        # LLaVA fills image-token positions with image features in order: only rows that
        # have an image contribute pixels.
        images = [p.pixels for p in batch if p.pixels is not None]
        pixels = torch.from_numpy(normalize(np.stack(images))) if images else None
        if pixels is not None:
            pixels = pixels.to(self.device, self.model.dtype)
        return ids.to(self.device), mask.to(self.device), pixels


def _held(text: str, stops: list[str]) -> int:
    """Length of the longest end of ``text`` that begins one of ``stops``."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def _generator(r: Request) -> torch.Generator | str:
    """The request's seeded sampling generator, or why its seed is unusable."""
    try:
        return torch.Generator().manual_seed(r.seed if r.seed is not None else 0)
    except (RuntimeError, ValueError, OverflowError) as e:
        return f"seed {r.seed}: {e}"


def read_meta(uri: str, image_size: int) -> dict:
    """Template and image settings saved with the model (defaults: Qilin-Med-VL's)."""
    meta = {"template": "v1", "aspect": "pad", "image_size": image_size}
    path = storage.join(uri, META_FILE)
    if storage.exists(path):
        meta.update(json.loads(storage.read_text(path)))
    return meta


def write_meta(uri: str, template: str, aspect: str, image_size: int) -> None:
    storage.write_text(storage.join(uri, META_FILE), json.dumps(
        {"template": template, "aspect": aspect, "image_size": image_size}, indent=2))

