"""GPU training benchmark at the real shape: model FLOP utilisation (MFU) of our training step.

The model is a random-init LLaVA of Qilin-Med-VL's architecture at 1B scale: CLIP
ViT-L/14-336 (frozen, feature layer -2, 576 image tokens) + ``mlp2x_gelu`` projector + a
1.1B Llama-2-style LLM (TinyLlama's shape with Llama-2's 32000-token vocabulary), 1.4B
parameters in all, trained in bf16 with the building blocks every Ray Train worker uses:
``trainable_groups``, ``deepspeed_config``, ``zero.initialize`` and ``collate``. One GPU, one
process (world size 1, NCCL): Ray's own per-step cost is what ``benchmarks/train.py``
measures on CPU; here the question is how much of the chip the step uses.

MFU = model FLOPs per step / step time / 790 TFLOP/s (the H200's dense bf16 matmul rate
measured on this workplace's machines; the run also measures it and prints both).
Model FLOPs per sample, PaLM's convention (causal attention counted in full, activation
recomputation not counted):
- vision tower, forward only (frozen, below the projector): 2*N_vit*577 + 2*P*576 + 4*L*577^2*d
- projector (trained in both stages): 6*N_proj*576, less 2*N_linear1*576 (its input, the
  frozen tower's output, needs no gradient)
- LLM, stage 2: (6*N + 12*L*S*d)*S; stage 1 (LLM frozen, but the backward pass still runs
  through it to reach the projector, without weight gradients): (4*N + 12*L*S*d)*S
where each N counts the weights of linear layers (the LLM's include lm_head; embedding
lookups, norms and biases are not matmuls) and P the patch-embedding convolution's weights.
``tests/test_benchmarks.py`` checks this against torch's FLOP counter.

Usage: python benchmarks/gpu_mfu.py [--steps 12] [--json FILE]      (one H200: ~3 minutes)
       python benchmarks/gpu_mfu.py --smoke                          (CPU: a tiny shape, to check the script)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from transformers import CLIPVisionConfig, LlamaConfig, LlavaForConditionalGeneration

from medvl.data.tokenize import IGNORE
from medvl.model.build import llava_config
from medvl.tokenizer import image_token_id
from medvl.train.batching import collate, model_inputs
from medvl.train.config import TrainConfig
from medvl.train.optim import trainable_groups
from medvl.train.zero import deepspeed_config, initialize

PEAK_BF16 = 790e12
WARMUP = 3


@dataclass(frozen=True)
class Run:
    name: str
    stage: int
    zero: int  # DeepSpeed ZeRO stage; -1: plain torch (autocast bf16, fp32 weights, fused AdamW)
    batch: int
    seq: int
    checkpointing: bool = False


RUNS = [
    Run("stage 1, ZeRO-2", 1, 2, batch=32, seq=640),  # alignment: image + short caption
    Run("stage 2, ZeRO-2", 2, 2, batch=8, seq=2048),  # instruction tuning at max length 2048
    Run("stage 2, ZeRO-2, batch 16", 2, 2, batch=16, seq=2048),
    Run("stage 2, plain torch", 2, -1, batch=8, seq=2048),
    Run("stage 2, ZeRO-3", 2, 3, batch=8, seq=2048),
    Run("stage 2, ZeRO-3 + ckpt", 2, 3, batch=8, seq=2048, checkpointing=True),  # the recipe's setting
]


def shapes(smoke: bool) -> tuple[CLIPVisionConfig, LlamaConfig]:
    if smoke:
        return (CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 image_size=56, patch_size=14),
                LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=4096))
    return (CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                             num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768),
            LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                        num_key_value_heads=4, max_position_embeddings=4096))


def llama2_sized_tokenizer(vocab: int = 32000):
    """A word-level stand-in with Llama-2's vocabulary size: the lm_head's FLOPs are real."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from medvl.tokenizer import prepare

    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="<unk>")),
                                  bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    return prepare(tok)


def matmul_weights(module: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


def model_flops(model: LlavaForConditionalGeneration, run: Run) -> float:
    """Model FLOPs of one optimizer step (see the module docstring)."""
    v, t = model.config.vision_config, model.config.text_config
    img = model.config.image_seq_length
    tower = model.model.vision_tower
    proj = model.model.multi_modal_projector
    n_vit = matmul_weights(tower)
    n_llm = matmul_weights(model.model.language_model) + matmul_weights(model.lm_head)
    patch = sum(m.weight.numel() for m in tower.modules() if isinstance(m, torch.nn.Conv2d))
    vision = 2 * n_vit * (img + 1) + 2 * patch * img + 4 * v.num_hidden_layers * (img + 1) ** 2 * v.hidden_size
    llm = ((6 if run.stage == 2 else 4) * n_llm + 12 * t.num_hidden_layers * run.seq * t.hidden_size) * run.seq
    projector = (6 * matmul_weights(proj) - 2 * proj.linear_1.weight.numel()) * img
    return run.batch * (vision + projector + llm)


def random_rows(tok, img_tokens: int, image_size: int, run: Run, rng: np.random.Generator) -> dict:
    """One micro batch in the Parquet shard's row format: <s> <image>*576 text, image labels ignored."""
    image_id, vocab = image_token_id(tok), len(tok)
    ids, labels = [], []
    for _ in range(run.batch):
        text = rng.integers(3, vocab - 2, run.seq - 1 - img_tokens)
        ids.append(np.concatenate([[tok.bos_token_id], np.full(img_tokens, image_id), text]))
        labels.append(np.concatenate([np.full(1 + img_tokens, IGNORE), text]))
    pixels = [rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8).tobytes() for _ in range(run.batch)]
    return {"input_ids": ids, "labels": labels, "pixels": pixels}


def time_run(run: Run, tok, steps: int, smoke: bool, device: torch.device) -> dict:
    """Median step time (after warm-up) of one configuration, with its model FLOPs and peak memory."""
    vision, text = shapes(smoke)
    with device:
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(llava_config(vision, text, tok)).train()
    if run.checkpointing:
        model.gradient_checkpointing_enable()
    cfg = TrainConfig(stage=run.stage, num_workers=1, use_gpu=device.type == "cuda", batch_size=run.batch,
                      zero_stage=max(run.zero, 0), bf16=device.type == "cuda")
    flops = model_flops(model, run)  # before ZeRO-3 partitions the parameters away
    params = sum(p.numel() for p in model.parameters())
    rows = random_rows(tok, model.config.image_seq_length, vision.image_size, run, np.random.default_rng(0))
    opt = torch.optim.AdamW(trainable_groups(model, cfg), lr=1e-5, fused=device.type == "cuda")
    engine = initialize(model, opt, None, deepspeed_config(cfg)) if run.zero >= 0 else None
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        batch = model_inputs(collate(rows, tok.pad_token_id, vision.image_size), device)
        if engine is not None:
            engine.backward(engine(**batch).loss)
            engine.step()
        else:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = model(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        sync()
        times.append(time.perf_counter() - t0)
    step = statistics.median(times[WARMUP:])
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    return {"run": run.name, "step_s": step, "model_tflop": flops / 1e12, "tflops": flops / step / 1e12,
            "tokens_per_s": run.batch * run.seq / step, "peak_gib": peak_mem, "params_b": params / 1e9}


def matmul_peak() -> float:
    """Dense bf16 matmul rate of this chip (8192^3, mean of 10 after 3 warm-ups), FLOP/s."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - t0)


def one_run(run: Run, steps: int, smoke: bool, port: int) -> dict:
    """One configuration in this process, as its own world of one."""
    device = torch.device("cpu" if smoke else "cuda:0")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo" if smoke else "nccl", device_id=None if smoke else device)
    try:
        return time_run(run, llama2_sized_tokenizer(500 if smoke else 32000), steps, smoke, device)
    finally:
        dist.destroy_process_group()


def in_subprocess(index: int, args: argparse.Namespace) -> dict:
    """Each configuration in a fresh process: DeepSpeed engines (ZeRO-3's above all) are not
    freed by ``del``, and memory left behind would skew the next run's time and peak memory."""
    cmd = [sys.executable, __file__, "--one", str(index), "--steps", str(args.steps), *(["--smoke"] * args.smoke)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:  # one failing configuration must not lose the others' figures
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(lines[-1])


def print_table(runs: list[Run], results: list[dict], peak: float) -> None:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (smoke run)"
    params = next((r["params_b"] for r in results if "params_b" in r), 0.0)
    print(f"\nGPU: {name}; measured bf16 matmul peak {peak / 1e12:.0f} TFLOP/s; MFU against "
          f"{PEAK_BF16 / 1e12:.0f}. Model: {params:.2f}B parameters, one process per run.")
    print(f"{'run':<26}{'batch x seq':>12}{'step ms':>9}{'TFLOP/step':>11}{'TFLOP/s':>9}{'MFU':>7}"
          f"{'tok/s':>9}{'GiB':>6}")
    for run, r in zip(runs, results, strict=True):
        if "error" in r:
            print(f"{run.name:<26}  failed: {r['error']}")
            continue
        print(f"{run.name:<26}{f'{run.batch} x {run.seq}':>12}{1000 * r['step_s']:>9.0f}{r['model_tflop']:>11.1f}"
              f"{r['tflops']:>9.0f}{r['tflops'] * 1e12 / PEAK_BF16:>7.1%}{r['tokens_per_s']:>9.0f}"
              f"{r['peak_gib']:>6.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12, help="steps per configuration, 3 of them warm-up")
    ap.add_argument("--smoke", action="store_true", help="tiny shape on CPU: checks the script, measures nothing")
    ap.add_argument("--json", default="", help="also write the results here")
    ap.add_argument("--one", type=int, default=-1, help=argparse.SUPPRESS)  # internal: run RUNS[i] here
    args = ap.parse_args()
    runs = [Run(r.name, r.stage, r.zero, 2, 128, r.checkpointing) for r in RUNS] if args.smoke else RUNS
    if args.one >= 0:
        print(json.dumps(one_run(runs[args.one], args.steps, args.smoke, 29534 + args.one)), flush=True)
        return
    peak = 0.0 if args.smoke else matmul_peak()
    results = []
    for i, run in enumerate(runs):
        results.append({"run": run.name, **in_subprocess(i, args)})
        print(json.dumps(results[-1]), flush=True)
    print_table(runs, results, peak)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"peak_tflops": peak / 1e12, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
