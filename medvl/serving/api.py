"""OpenAI's chat-completions wire format: request models, validation and error bodies.

Everything a client can get wrong becomes an ``APIError`` with a 4xx status and OpenAI's
``{"error": {"message", "type", "code"}}`` body, raised before the model is touched, so a
bad request can never take a replica down.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, Field, StrictBool

from medvl.data.templates import IMAGE
from medvl.serving import remote
from medvl.serving.engine import Request, Result


@dataclass
class ServeConfig:
    """Serving settings; every field can be set in ``serve/config.yaml``."""

    model: str = field(default="", metadata={"help": "exported HF model directory (URI)"})
    model_name: str = field(default="medvl", metadata={"help": "id clients pass as `model`"})
    backend: Literal["medvl", "vllm"] = field(default="medvl", metadata={"help": "the engine behind the front: medvl (ours) or vllm"})
    max_body_bytes: int = field(default=20_000_000, metadata={"help": "largest request body"})
    body_timeout_s: float = field(default=30.0, metadata={"help": "time a client has to send its whole body (408 after)"})
    max_image_bytes: int = field(default=10_000_000, metadata={"help": "largest decoded image payload"})
    max_image_pixels: int = field(default=50_000_000, metadata={"help": "pixel-bomb guard"})
    max_prompt_tokens: int = field(default=2048, metadata={"help": "longest prompt, image included"})
    max_tokens_cap: int = field(default=512, metadata={"help": "upper bound on a request's max_tokens"})
    max_batch_size: int = field(default=8, metadata={"help": "dynamic batching: requests per forward"})
    batch_wait_timeout_s: float = field(default=0.02, metadata={"help": "dynamic batching: wait to fill a batch"})
    api_keys_env: str = field(default="MEDVL_API_KEYS", metadata={"help": "env var with comma-separated API keys"})
    api_key_file: str = field(default="", metadata={"help": "file with one API key per line"})
    allowed_image_hosts: list[str] = field(default_factory=list, metadata={
        "help": "host[:port] pairs http(s) image URLs may come from (no port: the scheme's default)"})
    allow_private_image_hosts: bool = field(default=False, metadata={
        "help": "let allowed image hosts resolve to private, loopback or link-local addresses (tests)"})
    image_fetch_timeout_s: float = field(default=10.0, metadata={
        "help": "time one remote image may take in all, redirects included"})
    allow_burned_in_annotation: bool = field(default=False, metadata={
        "help": "accept DICOM whose BurnedInAnnotation is YES (patient text in the pixels); default: 400"})
    allow_anonymous: bool = field(default=False, metadata={"help": "serve without API keys on a non-loopback host"})
    max_requests_per_key: int = field(default=64, metadata={"help": "requests one API key may have in flight per front replica (429 after)"})


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def body(self) -> dict[str, Any]:
        """OpenAI's error object: message, type, param (the offending field), code."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# --- request models (also the /openapi.json schema) -------------------------------------
MAX_MESSAGES = 256  # turns of one conversation (the prompt's character bound applies too)
MAX_PARTS = 64  # content parts of one message
MAX_STOPS = 4  # OpenAI's limit on `stop`
MAX_STOP_CHARS = 256  # each step checks every prefix of every stop against the text's end
Stop = Annotated[str, Field(max_length=MAX_STOP_CHARS)]

class ImageURL(BaseModel):
    url: str


class ContentPart(BaseModel):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]  # developer: OpenAI's newer "system"
    content: str | Annotated[list[ContentPart], Field(max_length=MAX_PARTS)] | None = None  # None: an assistant turn that called a tool


class PreviewRequest(BaseModel):
    """``POST /v1/images/preview``: one image, as a chat request's ``image_url`` part has it."""

    image_url: ImageURL


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class ChatCompletionRequest(BaseModel):
    model: str
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # OpenAI's newer max_tokens
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOPS)] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)  # what every engine's generator takes
    stream: StrictBool = False  # "yes" is not a boolean
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1, description="one choice per request")
    # Known OpenAI parameters this server does not honour: accepted only at their defaults,
    # so a client relying on one gets a 400 naming it rather than a silently different answer.
    logprobs: Literal[False] | None = None
    top_logprobs: Literal[0] | None = None
    tools: list[Any] | None = Field(default=None, max_length=0)
    tool_choice: Literal["none"] | None = None
    functions: list[Any] | None = Field(default=None, max_length=0)
    response_format: dict[str, Literal["text"]] | None = None
    logit_bias: dict[str, float] | None = Field(default=None, max_length=0)
    presence_penalty: Literal[0, 0.0] | None = None
    frequency_penalty: Literal[0, 0.0] | None = None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


CHARS_PER_TOKEN_BOUND = 32  # no tokenizer packs more characters into one token
MAX_JSON_VALUES = 65_536  # far above what a chat request needs (about 3 per plain message)


Body = TypeVar("Body", bound=BaseModel)


def parse_request(raw: bytes, model: type[Body] = ChatCompletionRequest) -> Body:
    """The body as a ``model`` (pydantic's ``ValueError`` if it is not one), for a worker
    thread; every JSON endpoint's body goes through here. Parsing holds the GIL in one call, so a thread alone would not free the event
    loop: 20 MB of tiny JSON values took a second even with the caps. Its values are counted
    first, at memchr speed, from what must precede every value but the first (``[ , :``)."""
    values = 1 + sum(raw.count(c) for c in (b"[", b",", b":"))
    if values > MAX_JSON_VALUES:
        raise APIError(400, f"request body has up to {values} JSON values, more than {MAX_JSON_VALUES}",
                       code="request_too_complex")
    return model.model_validate_json(raw)
DATA_URI = re.compile(r"^data:(?P<mime>[\w/.+-]+)?(;[\w=.-]+)*;base64,(?P<data>.*)$", re.S)


def image_bytes(url: str, cfg: ServeConfig, param: str = "messages") -> tuple[bytes, str]:
    """A ``data:`` URI's payload and a file name for the decoder (``.dcm`` for
    ``application/dicom``, which needs no preamble); remote URLs only from allow-listed hosts,
    redirects included (no SSRF: ``remote.py``). ``param``: the request field errors name."""
    m = DATA_URI.match(url)
    if m is None:
        if remote.target(url, cfg.allowed_image_hosts) is not None:
            try:
                return remote.fetch(url, cfg.allowed_image_hosts, cfg.max_image_bytes, cfg.image_fetch_timeout_s,
                                    cfg.allow_private_image_hosts), "remote"
            except remote.FetchError as e:  # the client's 4xx, not a 500
                raise APIError(e.status, e.message, code=e.code, param=param) from e
        raise APIError(400, "image_url must be a data:...;base64 URI (remote URLs are not allowed)",
                       code="invalid_image_url", param=param)
    if len(m["data"]) * 3 // 4 > cfg.max_image_bytes:
        raise APIError(413, f"image larger than {cfg.max_image_bytes} bytes", code="image_too_large", param=param)
    try:
        data = base64.b64decode(m["data"], validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(400, f"image_url is not valid base64: {e}", code="invalid_base64", param=param) from e
    return data, "upload.dcm" if (m["mime"] or "").lower() == "application/dicom" else "upload"


def to_engine_request(req: ChatCompletionRequest, cfg: ServeConfig, special: Sequence[str] = ()) -> Request:
    """Messages -> (question, answer) turns for the template, plus the single image.
    ``<image>`` and the ``special`` tokens (the tokenizer's) are removed from every turn:
    typed by a client, ``</s>`` or ``<|im_start|>`` became the very ids that delimit turns."""
    if req.model != cfg.model_name:
        raise APIError(404, f"model {req.model!r} does not exist; this server has {cfg.model_name!r}",
                       code="model_not_found")
    texts = [_text(msg) for msg in req.messages]
    chars = sum(map(len, texts))  # system messages too: refused before tokenising megabytes
    if chars > CHARS_PER_TOKEN_BOUND * cfg.max_prompt_tokens:
        raise APIError(400, f"prompt is {chars} characters, more than {cfg.max_prompt_tokens} tokens can hold",
                       code="context_length_exceeded", param="messages")
    image: bytes | None = None
    image_name = "upload"
    turns: list[tuple[str, str | None]] = []
    question: list[str] = []
    for msg, text in zip(req.messages, texts, strict=True):
        for part in msg.content if isinstance(msg.content, list) else ():
            if part.type == "text":
                continue
            if msg.role != "user" or part.image_url is None or image is not None:
                raise APIError(400, "exactly one image_url part, in a user message, is supported")
            image, image_name = image_bytes(part.image_url.url, cfg)
        if msg.role in ("system", "developer"):
            continue  # the template carries the system prompt the model was trained with
        text = strip_image_tags(text, (IMAGE, *special))
        if msg.role == "user":
            question.append(text)
        elif question:
            turns.append(("\n".join(question), text))
            question = []
    if not question:
        raise APIError(400, "the last message must come from the user")
    turns.append(("\n".join(question), None))
    if image is not None:  # training puts <image> at the start of the first human turn
        turns[0] = (f"{IMAGE}\n{turns[0][0]}", turns[0][1])
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return Request(turns=turns, image=image, image_name=image_name, max_tokens=min(req.token_limit or cfg.max_tokens_cap,
                                                            cfg.max_tokens_cap),
                   temperature=req.temperature, top_p=req.top_p, stop=stop, seed=req.seed)


def _text(msg: Message) -> str:
    """A message's text parts, joined."""
    if isinstance(msg.content, list):
        return "".join(part.text or "" for part in msg.content if part.type == "text")
    return msg.content or ""


def strip_image_tags(text: str, tags: Sequence[str] = (IMAGE,)) -> str:
    """``text`` with every ``<image>`` (and every other tag of ``tags``) removed to a fixed
    point, so a literal one typed by a user never becomes image tokens: one pass of
    ``replace`` turns ``<im<image>age>`` into ``<image>``. One linear scan: a tag completed by
    the character just kept is dropped at once, so no tag can survive (a pass per nesting
    level would be quadratic)."""
    tags = [t for t in tags if t]
    if not any(t in text for t in tags):  # nothing to remove, so no removal can form a tag
        return text
    out: list[str] = []
    for ch in text:
        out.append(ch)
        for tag in tags:
            if ch == tag[-1] and "".join(out[-len(tag):]) == tag:
                del out[-len(tag):]
                break
    return "".join(out)


# --- responses ---------------------------------------------------------------------------
def completion_body(result: Result, model: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                     "finish_reason": result.finish_reason}],
        "usage": usage(result),
    }


def usage(result: Result) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def chunk_body(cid: str, model: str, delta: dict | None, finish_reason: str | None,
               result: Result | None = None) -> dict[str, Any]:
    """A stream chunk; ``delta=None`` is the usage chunk (``stream_options.include_usage``):
    no choices, the usage."""
    body = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
    if result is not None:
        body["usage"] = usage(result)
    return body
