"""The causal-LM loss computed only where there is something to learn, a piece at a time.

``model(**batch).loss`` in transformers projects every position onto the vocabulary and upcasts
the logits to fp32 before the cross-entropy: at stage 1's 32 x 2048 with Llama-2's 32k vocabulary
that is ~25 GB of logits (bf16 + fp32 + their gradient) beside 26.7 GB of 13B weights. Most of
those positions carry no loss: the 576 image positions, the prompt, and the padding are -100.

Here the model runs without its head (``logits_to_keep`` selects no position; the final hidden
states come back as ``hidden_states[-1]``), the labelled positions are gathered after the causal
shift, and the language-model head and the cross-entropy run over them in a fixed number of
chunks, each under activation checkpointing so no chunk's logits are kept for backward. On CUDA
with Liger Kernel installed and the head not partitioned by ZeRO-3, its fused linear
cross-entropy replaces the chunks (it never materialises the logits at all).

Calling the head as a module (``lm_head(x)``), never touching ``lm_head.weight``, lets
DeepSpeed ZeRO-3's hooks gather its partitioned weight for the forward and for the recompute in
backward. The number of head calls per step is the same every step, so ZeRO-3's recorded module
order (its prefetch trace) stays valid whatever the batch's labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from medvl.data.tokenize import IGNORE

CHUNKS = 8  # head calls per micro batch: at most 1/8 of the labelled positions' logits are live

try:  # GPU only (Triton); absent on CPU installs
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
except ImportError:  # pragma: no cover - depends on the install
    LigerFusedLinearCrossEntropyLoss = None


def causal_lm_loss(model, batch: dict[str, torch.Tensor], chunks: int = CHUNKS) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions, as ``model(**batch).loss``.

    ``model`` is a DeepSpeed engine or the ``LlavaForConditionalGeneration`` itself (the engine's
    forward must run: under ZeRO-3 it starts each step's parameter trace). A batch with no
    labelled position gives a loss of 0 with zero gradients (transformers gives NaN there).
    """
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = model(**inputs, logits_to_keep=torch.zeros_like(labels, dtype=torch.bool), output_hidden_states=True)
    targets = labels[:, 1:]
    labelled = targets != IGNORE
    hidden = out.hidden_states[-1][:, :-1][labelled]  # [N, hidden]: the final norm's output
    head = getattr(model, "module", model).lm_head
    return head_cross_entropy(head, hidden, targets[labelled], chunks)


def head_cross_entropy(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                       chunks: int = CHUNKS) -> torch.Tensor:
    """Mean cross-entropy of ``head(hidden)`` against ``targets`` (all labelled), never holding
    more than one chunk's logits; 0 (still through the head, so every rank's ZeRO hooks run the
    same way) when there are no targets."""
    count = max(1, targets.numel())
    fused = _fused_loss(head, hidden)
    if fused is not None:
        return fused(head.weight, hidden, targets) / count
    total = hidden.new_zeros((), dtype=torch.float32)
    for h, y in zip(hidden.tensor_split(chunks), targets.tensor_split(chunks), strict=True):
        # No metadata check on the recomputed tensors: a frozen head's weight is saved as the
        # parameter itself, which ZeRO-3 has re-partitioned (shape [0]) by the time the check
        # runs; its pre-backward hook gathers it again before the head's backward reads it.
        total = total + checkpoint(_chunk_nll, head, h, y, use_reentrant=False, determinism_check="none")
    return total / count


def _chunk_nll(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed NLL of one chunk, its logits upcast to fp32 as transformers' loss does."""
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def _fused_loss(head: torch.nn.Module, hidden: torch.Tensor):
    """Liger's fused linear cross-entropy (summed) where it can run: CUDA, Liger installed, and
    the head's weight whole on this rank (ZeRO-3 partitions it; reading ``.weight`` there would
    bypass the gather, so the chunked path serves ZeRO-3)."""
    if LigerFusedLinearCrossEntropyLoss is None or not hidden.is_cuda or hasattr(head.weight, "ds_id"):
        return None
    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="sum")
