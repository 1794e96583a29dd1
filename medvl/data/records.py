"""Validate LLaVA / ChiMed-VL records; every failure is a ``Reject`` with a reason code.

Reasons (also documented in docs/guide.md): ``bad_json`` (not a JSON object), ``bad_record``
(JSON, but not a LLaVA record: no usable ``id``, ``conversations`` not a list of
human/gpt turns, an unanswered last question, a non-string ``image``), ``missing_image``,
``corrupt_image``, ``image_too_large``, ``burned_in_annotation`` (a DICOM whose pixels carry
patient text), ``no_image_token``, ``no_answer``, ``too_long``, ``path_outside_root``. A detail
never quotes the record: rejects.jsonl would copy patient text out of the corpus.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass

from medvl import storage
from medvl.data.templates import IMAGE

REASONS = (
    "bad_json",
    "bad_record",
    "missing_image",
    "corrupt_image",
    "image_too_large",
    "burned_in_annotation",
    "no_image_token",
    "no_answer",
    "too_long",
    "path_outside_root",
)


class Reject(Exception):
    def __init__(self, reason: str, detail: str):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Record:
    id: str
    image: str
    turns: list[tuple[str, str]]  # (question, answer) pairs, <image> in the first question


def parse(text: str) -> dict:
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as e:
        raise Reject("bad_json", f"{e.msg} at char {e.pos}") from e
    except (ValueError, RecursionError) as e:  # 100,000 "[" nest past Python's recursion limit;
        # an integer of 5,000 digits passes int()'s limit
        raise Reject("bad_json", f"{type(e).__name__}: {str(e)[:100]}") from e
    if not isinstance(rec, dict):
        raise Reject("bad_json", f"record is a {type(rec).__name__}, not an object")
    return rec


def record_id(rec: dict) -> str | None:
    """The record's id as a string, or None when it has no usable one."""
    rid = rec.get("id")
    if isinstance(rid, bool) or not isinstance(rid, str | int) or rid == "":
        return None
    return str(rid)


def validate(rec: dict) -> Record:
    """Check structure and pair up turns; raise ``Reject`` on the first problem found."""
    rid = record_id(rec)
    if rid is None:
        raise Reject("bad_record", f"'id' must be a non-empty string or integer, got {type(rec.get('id')).__name__}")
    convs = rec.get("conversations")
    if not isinstance(convs, list) or not all(
        isinstance(t, dict) and isinstance(t.get("value"), str) and t.get("from") in ("human", "gpt")
        for t in convs
    ):
        raise Reject("bad_record", "'conversations' must be a list of {from: human|gpt, value: str}")
    image = rec.get("image")
    if image is None or image == "":
        raise Reject("missing_image", "record has no 'image' field")
    if not isinstance(image, str):
        raise Reject("bad_record", f"'image' must be a string path, got {type(image).__name__}")
    if len(convs) % 2:
        raise Reject("bad_record", f"{len(convs)} turns: the last human turn has no answer")
    turns: list[tuple[str, str]] = []
    for i in range(0, len(convs), 2):
        q, a = convs[i], convs[i + 1]
        if q["from"] != "human" or a["from"] != "gpt":
            raise Reject("bad_record", f"turn {i} is not a human/gpt pair")
        turns.append((q["value"], a["value"]))
    if not turns or not all(a.strip() for _, a in turns):
        raise Reject("no_answer", "no (non-empty) gpt answer after a human turn")
    if IMAGE not in turns[0][0]:
        raise Reject("no_image_token", "first human turn has no <image>")
    if any(IMAGE in q for q, _ in turns[1:]) or turns[0][0].count(IMAGE) > 1:
        raise Reject("no_image_token", "exactly one <image>, in the first human turn, is supported")
    return Record(rid, image, turns)


def image_uri(root: str, rel: str) -> str:
    """Join ``rel`` under ``root``, refusing absolute paths and ``..`` escapes."""
    norm = posixpath.normpath(rel.replace("\\", "/"))
    if rel.startswith(("/", "\\")) or "://" in rel or norm == ".." or norm.startswith("../"):
        raise Reject("path_outside_root", f"{rel!r} escapes the image root")
    return storage.join(root, norm)
