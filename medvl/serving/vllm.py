"""vLLM as the engine behind our HTTP front (``backend: vllm``).

The front (``medvl.serving.app.ChatDeployment``) does for vLLM everything it does for our
engine: API keys, body/image/pixel limits, the SSRF guard, DICOM decoding and windowing,
the prompt from the training template, the ``max_tokens`` cap, OpenAI's errors. This
deployment gets the ``Prepared`` request (prompt ids and the fitted uint8 image) and hands
it to vLLM's ``AsyncLLM`` (paged attention, continuous batching). It has the same name and
calls (``generate``, ``complete``, ``decoding``) as our ``MedVLModel``, so the recipe's
deployment options apply to either. Needs vLLM on the model replicas (``make vllm`` here:
its CPU build; ``pip install vllm`` on GPU nodes).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

from ray import serve

from medvl import storage
from medvl.serving.api import ServeConfig
from medvl.serving.engine import (
    CONCURRENT_BATCHES,
    MIN_TEMPERATURE,
    Chunk,
    Prepared,
    Preparer,
    Result,
)


@serve.deployment(name="MedVLModel", max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
class VLLMDeployment:
    """One vLLM engine per replica (one GPU, or vLLM's CPU build without one)."""

    def __init__(self, cfg: ServeConfig):
        import torch

        try:
            from vllm import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as e:
            raise ImportError(f"backend: vllm needs vLLM on the model replicas (pip install vllm): {e}") from e
        gpu = torch.cuda.is_available()
        self.preparer = Preparer(cfg.model)  # stop tokens and the image token, as our engine has them
        with storage.local_dir(cfg.model) as local:  # the engine has read everything when it is built
            self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
                model=local, tokenizer=local, served_model_name=cfg.model_name,
                dtype="bfloat16" if gpu else "float32",  # as our engine: bf16 on GPU, fp32 on CPU
                # The front refuses longer prompts and caps max_tokens: this is what a request can need.
                max_model_len=cfg.max_prompt_tokens + cfg.max_tokens_cap,
                max_num_seqs=cfg.max_batch_size * CONCURRENT_BATCHES,  # as many as ours decode at once
                limit_mm_per_prompt={"image": 1}, enable_log_requests=False))
        self.ongoing = 0

    async def generate(self, prepared: Prepared) -> AsyncIterator[Chunk]:
        """One request's chunks, a delta per step. A caller that goes away cancels this call,
        and vLLM aborts the request (its ``generate`` does on cancellation)."""
        from vllm.sampling_params import RequestOutputKind

        self.ongoing += 1
        try:
            async for chunk in self._run(prepared, RequestOutputKind.DELTA):
                yield chunk
        finally:
            self.ongoing -= 1

    async def complete(self, prepared: Prepared) -> Chunk:
        """A non-streaming request: vLLM sends only its final output."""
        from vllm.sampling_params import RequestOutputKind

        self.ongoing += 1
        try:
            async for chunk in self._run(prepared, RequestOutputKind.FINAL_ONLY):
                if chunk.result is not None or chunk.error is not None:
                    return chunk
            return Chunk("", error="generation ended without a result")
        finally:
            self.ongoing -= 1

    def decoding(self) -> int:
        """Requests in vLLM now (``/healthz`` reports it)."""
        return self.ongoing

    async def _run(self, prepared: Prepared, kind) -> AsyncIterator[Chunk]:
        """vLLM's outputs as our chunks. Answers start without the space the template puts
        before them, as our engine's do. A request vLLM refuses fails alone."""
        delta = kind.name == "DELTA"  # else FINAL_ONLY: one output with all text and tokens
        text, started, tokens = "", False, 0
        try:
            async for out in self.engine.generate(self._prompt(prepared), self._params(prepared, kind),
                                                  request_id=uuid.uuid4().hex):
                piece = out.outputs[0].text
                if not started:
                    piece = piece.lstrip()
                    started = bool(piece)
                text = text + piece if delta else piece
                tokens = tokens + len(out.outputs[0].token_ids) if delta else len(out.outputs[0].token_ids)
                result = None
                if out.finished:
                    reason = "length" if out.outputs[0].finish_reason == "length" else "stop"
                    result = Result(text, reason, len(prepared.ids), tokens)
                yield Chunk(piece if delta else "", result)
        except ValueError as e:  # vLLM's own validation of one request
            yield Chunk("", error=f"vLLM refused the request: {e}")

    def _prompt(self, prepared: Prepared) -> dict:
        """Our prompt ids with the image placeholder as one token (vLLM expands it to the
        image's feature count itself) and the image as our loader fitted it: padded,
        resized, so vLLM's processor only normalises it."""
        from PIL import Image

        if prepared.pixels is None:
            return {"prompt_token_ids": prepared.ids}
        return {"prompt_token_ids": _collapse(prepared.ids, self.preparer.image_token_id),
                "multi_modal_data": {"image": Image.fromarray(prepared.pixels)}}

    def _params(self, prepared: Prepared, kind):
        from vllm import SamplingParams

        r = prepared.req
        greedy = r.temperature < MIN_TEMPERATURE  # as our engine: below this, the argmax
        return SamplingParams(
            max_tokens=r.max_tokens, temperature=0.0 if greedy else r.temperature,
            top_p=1.0 if greedy else r.top_p, seed=None if greedy else (r.seed or 0),
            stop=r.stop or None, stop_token_ids=sorted(self.preparer.stop_ids),
            skip_special_tokens=True, output_kind=kind)


def _collapse(ids: list[int], token: int) -> list[int]:
    """``ids`` with each run of ``token`` shortened to one."""
    return [t for i, t in enumerate(ids) if t != token or i == 0 or ids[i - 1] != token]
