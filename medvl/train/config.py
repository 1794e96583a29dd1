"""Typed training recipe: one ``TrainConfig`` per curriculum stage (YAML sections stage1/stage2)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Literal


@dataclass
class TrainConfig:
    stage: Literal[1, 2] = field(default=1, metadata={"help": "1: projector only; 2: projector + LLM"})
    data: str = field(default="", metadata={"help": "`medvl preprocess` output directory (URI)"})
    output: str = field(default="", metadata={"help": "run directory (URI): Ray Train checkpoints + hf/"})
    name: str = field(default="train", metadata={"help": "Ray Train run name; same name + output resumes"})
    init: str = field(default="", metadata={"help": "HF model to start from (stage 2: stage 1's hf/)"})
    tokenizer: str = field(default="", metadata={"help": "tokenizer directory, when building a new model"})
    vision_tower: str = field(default="", metadata={"help": "CLIP directory; empty with llm empty: tiny preset"})
    llm: str = field(default="", metadata={"help": "Llama/Qwen2 directory"})
    num_workers: int = field(default=2, metadata={"help": "Ray Train workers (one per GPU)"})
    use_gpu: bool = field(default=False, metadata={"help": "NCCL + CUDA when true, gloo + CPU otherwise"})
    cpus_per_worker: float = field(default=0.5, metadata={"help": "leave CPUs for Ray Data tasks"})
    batch_size: int = field(default=8, metadata={"help": "per-worker micro batch"})
    grad_accum: int = field(default=1, metadata={"help": "gradient accumulation steps"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    warmup_ratio: float = field(default=0.03, metadata={"help": "linear warmup share of steps, then cosine"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    epochs: int = field(default=1, metadata={"help": "passes over the data"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many optimizer steps (0: all)"})
    zero_stage: Literal[0, 1, 2, 3] = field(default=2, metadata={"help": "DeepSpeed ZeRO stage"})
    # ZeRO-3 steps the optimizer one sub-group of its partition at a time, and for each makes
    # an fp32 copy of the sub-group's gradients first (``_prepare_fp32_grad_for_sub_group``: a
    # flattened copy, then the cast from bf16). LLaVA's 1e9 elements is the whole partition of
    # a rank up to 8B parameters per rank: at 13B on 8 GPUs that is 1e9 x (2 + 4) bytes = 5.6
    # GiB of GPU memory at each step; 1e7 makes it 60 MB (on the CPU rehearsal: -0.5 W of a
    # worker's peak, benchmarks/memory.py). Adam is elementwise: the same update, in more
    # kernel calls, so not a result-changing field; but a checkpoint loads only with the
    # sub-group size it was saved with (``checkpoint.check_resumable``).
    zero_sub_group_size: int = field(default=10**7, metadata={
        "help": "ZeRO-3 optimizer sub-group (elements); resume a checkpoint with the value it was saved with",
        "result": False})
    bf16: bool = field(default=False, metadata={"help": "bf16 (GPU); fp32 is faster on CPU"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations"})
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] = field(
        default="sdpa", metadata={"help": "attention kernel (flash_attention_2: GPU + bf16, flash-attn installed)",
                                  "result": False})
    checkpoint_every: int = field(default=0, metadata={"help": "steps between checkpoints (0: end only)"})
    max_shard_mb: int = field(default=5000, metadata={"help": "largest safetensors shard of the exported model"})
    keep_checkpoints: int = field(default=2, metadata={"help": "checkpoints kept in storage", "result": False})
    max_failures: int = field(default=2, metadata={"help": "worker failures survived by restoring", "result": False})
    # Ray Train's TorchConfig gives collectives 1800 s: the ranks that finished their upload
    # wait that long in save_checkpoint for one that did not, so stop that one first.
    upload_timeout_s: float = field(default=1500, metadata={
        "help": "seconds a rank waits for its previous checkpoint's upload before failing the attempt",
        "result": False})
    seed: int = field(default=0, metadata={"help": "model init and batch order"})
    lora_r: int = field(default=0, metadata={"help": "stage 2: LoRA rank on the LLM (0: full fine-tuning)"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA branch"})
    mm_projector_lr: float = field(default=0.0, metadata={"help": "projector lr if different (0: lr)"})
    group_by_length: bool = field(default=True, metadata={"help": "batch samples of similar length"})
    val_every: int = field(default=-1, metadata={
        "help": "steps between validation losses on the data's held-out rows (preprocess val_fraction), "
                "and at the end; -1: at every checkpoint; 0: off"})
    log_every: int = field(default=10, metadata={"help": "steps between progress lines", "result": False})

    def __post_init__(self) -> None:
        """flash_attention_2 stops here, in one line, where it could only fail in the workers."""
        if self.attn_implementation != "flash_attention_2":
            return
        if not (self.use_gpu and self.bf16):
            raise ValueError("attn_implementation: flash_attention_2 runs on GPU in bf16 only "
                             "(set use_gpu and bf16, or use sdpa)")
        if importlib.util.find_spec("flash_attn") is None:
            raise ValueError("attn_implementation: flash_attention_2 needs the flash-attn package "
                             "(pip install flash-attn --no-build-isolation), or use sdpa")

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.num_workers
