"""The loss over labelled positions only, in chunks: the same loss and gradients as
transformers' ``model(**batch).loss``, without ever holding logits for every position."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

from medvl.data.tokenize import IGNORE
from medvl.tokenizer import image_token_id
from medvl.train import loss as loss_module
from medvl.train.config import TrainConfig
from medvl.train.loss import CHUNKS, causal_lm_loss, head_cross_entropy
from medvl.train.model import build_model
from medvl.train.optim import trainable_groups


def _model(demo_dir, **kw):
    cfg = TrainConfig(tokenizer=str(demo_dir / "tokenizer"), lora_dropout=0.0, **kw)
    model, tok = build_model(cfg)
    trainable_groups(model, cfg)  # what learns in this stage (LoRA adapters injected here)
    return model, tok


def _batch(model, tok, seed: int = 0) -> dict[str, torch.Tensor]:
    """Three rows, right-padded as the collate pads: a long one, a short one, one with no label."""
    g = torch.Generator().manual_seed(seed)
    n, vocab = model.config.image_seq_length, model.config.text_config.vocab_size
    lengths, width = [n + 12, n + 6, n + 9], n + 12
    ids = torch.full((3, width), tok.pad_token_id)
    labels = torch.full((3, width), IGNORE)
    mask = torch.zeros(3, width, dtype=torch.long)
    for row, length in enumerate(lengths):
        text = torch.randint(3, vocab - 2, (length - 1 - n,), generator=g)  # below <image>/<pad>
        ids[row, :length] = torch.cat([torch.tensor([tok.bos_token_id or 1]),
                                       torch.full((n,), image_token_id(tok)), text])
        mask[row, :length] = 1
        if row != 2:  # the answer (the last 4 tokens) is labelled; row 2 has no label at all
            labels[row, length - 4:length] = ids[row, length - 4:length]
    size = model.config.vision_config.image_size
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "pixel_values": torch.randn(3, 3, size, size, generator=g)}


def _loss_and_grads(model, batch, loss_fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _today(model, batch):
    return model(**batch).loss


@pytest.mark.parametrize("kw", [dict(stage=1), dict(stage=2, gradient_checkpointing=True),
                                dict(stage=2, gradient_checkpointing=True, lora_r=4)],
                         ids=["stage1", "stage2-checkpointing", "stage2-lora-checkpointing"])
def test_loss_and_gradients_equal_transformers(demo_dir, kw):
    model, tok = _model(demo_dir, **kw)
    batch = _batch(model, tok)
    want_loss, want = _loss_and_grads(model, batch, _today)
    got_loss, got = _loss_and_grads(model, batch, causal_lm_loss)
    torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=1e-5)
    assert got.keys() == want.keys() and len(got) > 0
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-5, msg=name)
    assert any(g.abs().sum() > 0 for g in got.values())


def test_a_batch_without_labels_gives_zero_not_nan(demo_dir):
    model, tok = _model(demo_dir, stage=2)
    batch = _batch(model, tok)
    batch["labels"] = torch.full_like(batch["labels"], IGNORE)
    assert math.isnan(_today(model, batch).item())  # transformers: 0/0
    loss, grads = _loss_and_grads(model, batch, causal_lm_loss)
    assert loss.item() == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in grads.values())


class _LargestLogits(TorchDispatchMode):
    """Rows of the largest vocabulary-wide tensor any op creates: the head's weight, its views
    and its [hidden, vocab] gradient products aside."""

    def __init__(self, model):
        super().__init__()
        self.vocab, self.rows = model.config.text_config.vocab_size, 0
        self.weight_shape = (model.config.text_config.hidden_size, self.vocab)
        self.storages = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if (isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == self.vocab
                    and tuple(t.shape) != self.weight_shape
                    and t.untyped_storage().data_ptr() not in self.storages):
                self.rows = max(self.rows, t.numel() // self.vocab)
        return out


@pytest.mark.parametrize("loss_fn", [_today, causal_lm_loss], ids=["transformers", "chunked"])
def test_logits_never_span_every_position(demo_dir, loss_fn):
    """Forward and backward: transformers' path creates [B, T, V] logits; ours at most one
    chunk of the labelled positions."""
    model, tok = _model(demo_dir, stage=2, gradient_checkpointing=True)
    batch = _batch(model, tok)
    labelled = int((batch["labels"][:, 1:] != IGNORE).sum())
    with _LargestLogits(model) as probe:
        loss_fn(model, batch).backward()
    if loss_fn is _today:
        assert probe.rows == batch["labels"].numel()
    else:
        assert 0 < probe.rows <= math.ceil(labelled / CHUNKS)


def _zero3_rank(rank: int, tmp: str, tokenizer: str, lora_r: int) -> None:
    """One rank of a 2-process ZeRO-3 engine (gloo, gradient checkpointing, the real set-up):
    each path's loss and full (gathered) gradients, saved for the parent to compare."""
    import deepspeed.utils

    from medvl.train.zero import deepspeed_config, initialize

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=2)
    cfg = TrainConfig(stage=2, tokenizer=tokenizer, zero_stage=3, batch_size=3, num_workers=2,
                      gradient_checkpointing=True, lora_r=lora_r, lora_dropout=0.0)
    model, tok = build_model(cfg)
    groups = trainable_groups(model, cfg)
    ds = deepspeed_config(cfg)
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition the tiny head too, as 13B's
    engine = initialize(model, torch.optim.SGD([{**g, "lr": 0.0} for g in groups]), None, ds)
    batch = _batch(model, tok, seed=rank)
    out = {}
    # chunked first: on a later step ZeRO-3's recorded trace may prefetch the head for it anyway
    for name, loss_fn in (("chunked", causal_lm_loss), ("transformers", _today)):
        loss = loss_fn(engine, batch)
        engine.backward(loss)
        grads = {n: deepspeed.utils.safe_get_full_grad(p) for n, p in engine.module.named_parameters()
                 if p.requires_grad}
        out[name] = (loss.detach(), grads)
        engine.step()  # lr 0: the weights stay, the gradients are cleared
    for extra in (3, 9):  # two more steps, labelling more of row 0: another count of positions
        batch["labels"][0, -4 - extra:] = batch["input_ids"][0, -4 - extra:]
        engine.backward(causal_lm_loss(engine, batch))
        engine.step()
    # The head runs as often whatever the labels, so the module order ZeRO-3 recorded on the
    # first of them still held on the second (a changed order resets the trace, and prefetch).
    out["trace_complete"] = engine.optimizer.parameter_offload.get_param_coordinator().is_complete_trace()
    torch.save(out, f"{tmp}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("lora_r", [0, 4], ids=["full", "lora"])
def test_zero3_partitioned_head_gives_the_same_loss_and_gradients(demo_dir, tmp_path, lora_r):
    """lm_head's weight is partitioned: only calling the module lets ZeRO-3 gather it (with
    LoRA the head is frozen, and saved for backward as the partitioned parameter itself); and
    ZeRO-3's recorded module order survives a change in the number of labelled positions."""
    # fork: the ranks share this process's imports (a spawn re-imports transformers and DeepSpeed)
    mp.start_processes(_zero3_rank, args=(str(tmp_path), str(demo_dir / "tokenizer"), lora_r), nprocs=2,
                       start_method="fork")
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        assert results["trace_complete"]
        (want_loss, want), (got_loss, got) = results["transformers"], results["chunked"]
        torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=1e-5)
        assert ("lm_head.weight" in want) == (lora_r == 0) and got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available() or loss_module.LigerFusedLinearCrossEntropyLoss is None,
                    reason="Liger Kernel's fused linear cross-entropy runs on CUDA only")
def test_liger_fused_loss_equals_transformers_on_cuda():
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 1000, bias=False, device="cuda")
    hidden = torch.randn(300, 64, device="cuda", requires_grad=True)
    targets = torch.randint(0, 1000, (300,), device="cuda")
    assert loss_module._fused_loss(head, hidden) is not None  # the fused path is the one tested
    results = []
    for fn in (lambda: head_cross_entropy(head, hidden, targets),
               lambda: torch.nn.functional.cross_entropy(head(hidden).float(), targets)):
        head.zero_grad(set_to_none=True)
        hidden.grad = None
        loss = fn()
        loss.backward()
        results.append((loss.detach(), hidden.grad.clone(), head.weight.grad.clone()))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
