"""``medvl chat``: ask an exported model one question about one image, no Ray, no server.

The same engine, template and image pipeline as ``medvl serve`` (so the answer is the one
the endpoint would give), run in this process and streamed to the terminal as it is made.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from medvl import storage
from medvl.data.templates import IMAGE


def check_model_dir(uri: str) -> None:
    """A one-line ``ValueError`` unless ``uri`` holds an exported HF model (its config.json)."""
    if not storage.exists(storage.join(uri, "config.json")):
        raise ValueError(f"{uri}: not an exported model directory (no config.json); pass the `hf/` "
                         "or `model/` directory a training run wrote")


def read_image(uri: str) -> bytes:
    """The image file's bytes, or a one-line ``ValueError`` (missing, a directory, unreadable)."""
    try:
        return storage.read_bytes(uri)
    except FileNotFoundError:
        raise ValueError(f"{uri}: no such image file") from None
    except (OSError, ValueError) as e:  # a directory: pyarrow's OSError; a NUL in the path: ArrowInvalid
        raise ValueError(f"{uri}: cannot read the image: {e}") from None


def chat(model: str, question: str, image: str | None = None, max_tokens: int = 128,
         temperature: float = 0.0) -> Iterator[str]:
    """Text deltas of the model's answer to ``question`` about ``image`` (DICOM, PNG or JPEG)."""
    import torch
    from transformers.utils import logging as hf_logging

    from medvl.data.images import ImageError
    from medvl.serving.engine import Engine, Request

    check_model_dir(model)
    data = read_image(image) if image is not None else None  # before the model loads: mistakes fail fast
    hf_logging.disable_progress_bar()  # the answer is the output; no loading bar before it
    engine = Engine(model, device="cuda" if torch.cuda.is_available() else "cpu")
    req = Request(turns=[(f"{IMAGE}\n{question}" if image else question, None)], max_tokens=max_tokens,
                  temperature=temperature,
                  image=data,
                  image_name=os.path.basename(image) if image else "upload")
    try:
        prepared = engine.prepare(req)
    except ImageError as e:
        raise ValueError(f"{image}: {e}") from e
    for chunks in engine.generate_batch([prepared]):
        chunk = chunks[0]
        if chunk is None:
            continue
        if chunk.error:
            raise ValueError(chunk.error)
        yield chunk.delta
