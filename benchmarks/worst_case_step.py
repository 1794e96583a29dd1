"""The worst-case training step's memory, before and after ``medvl.train.loss``'s chunked,
labelled-only loss; printed as a row of ``benchmarks/memory.py`` (which runs it last, or alone
with ``--worst-case-only``). Each variant runs in a process of its own.

Usage: python benchmarks/worst_case_step.py [--workdir benchmarks/out/memory]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import psutil

# The worst-case step: stage 1's longest rows (2048 tokens, 576 of them the image's), Llama-2's
# 32k vocabulary, every text position labelled; a 2-layer LLM, so the head and the loss dominate
# as at 13B. fp32 (the CPU's training dtype): the fp32 upcast is then no copy, so "before" is
# if anything understated.
WORST = dict(rows=2, length=2048, image_tokens=576, vocab=32000, hidden=512, layers=2)


def worst_case_child(variant: str, tokenizer: str) -> None:
    """One forward + backward of the worst-case batch with transformers' loss ("before": logits
    for every position) or ``medvl.train.loss`` ("after"); prints the step's peak RSS over the
    RSS before it, in bytes (run in a fresh process per variant: ``ru_maxrss`` is a lifetime peak)."""
    import resource

    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    from medvl.tokenizer import image_token_id, load
    from medvl.train.batching import model_inputs
    from medvl.train.loss import causal_lm_loss
    from medvl.train.model import prepare_for_training
    from medvl.train.probe import worst_case_batch

    torch.manual_seed(0)
    tok = load(tokenizer)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                              image_size=24 * 14, patch_size=14)  # 576 patches, as CLIP ViT-L/14-336
    text = LlamaConfig(hidden_size=WORST["hidden"], intermediate_size=4 * WORST["hidden"],
                       num_hidden_layers=WORST["layers"], num_attention_heads=8, vocab_size=WORST["vocab"],
                       max_position_embeddings=WORST["length"], pad_token_id=tok.pad_token_id)
    model = prepare_for_training(LlavaForConditionalGeneration(LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=image_token_id(tok),
        image_seq_length=WORST["image_tokens"], vision_feature_select_strategy="default",
        vision_feature_layer=-2)), gradient_checkpointing=True)
    model.model.vision_tower.requires_grad_(False)
    batch = model_inputs(worst_case_batch(model, tok, WORST["rows"], WORST["length"]), "cpu")
    before = psutil.Process().memory_info().rss
    loss = model(**batch).loss if variant == "before" else causal_lm_loss(model, batch)
    loss.backward()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)


def worst_case_row(root: Path) -> None:
    """The worst-case step before and after (each in its own process, both in this run) and
    the ratio's verdict: chunking must at least halve the step's memory."""
    from medvl.data.demo import build_demo_data

    if not (root / "demo").exists():
        build_demo_data(str(root / "demo"), variants=1)
    peaks = {v: int(subprocess.run([sys.executable, __file__, "--worst-case", v, "--tokenizer",
                                    str(root / "demo/tokenizer")], check=True, capture_output=True,
                                   text=True).stdout.split()[-1]) for v in ("before", "after")}
    ratio = peaks["after"] / peaks["before"]
    w = WORST
    name = f"worst-case step {w['rows']} x {w['length']} (V {w['vocab']}): peak over its start, GB"
    print(f"\n{'figure':<58}{'before':>12}{'after':>12}  target")
    print(f"{name:<58}{peaks['before'] / 1e9:>12.2f}{peaks['after'] / 1e9:>12.2f}")
    verdict = "MET" if ratio <= 0.5 else "MISSED"
    print(f"{'worst-case step: after / before':<58}{'':>12}{ratio:>12.2f}  <=0.50  {verdict}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="benchmarks/out/memory")
    ap.add_argument("--worst-case", choices=("before", "after"), help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worst_case:
        return worst_case_child(args.worst_case, args.tokenizer)
    worst_case_row(Path(args.workdir).resolve())


if __name__ == "__main__":
    main()
