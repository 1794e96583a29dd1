"""The export's streaming safetensors writer: files safetensors itself reads back exactly."""

import pytest
import torch
from safetensors import safe_open

from medvl.train.export import ShardWriter


def _tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"b.weight": torch.randn(3, 5).to(torch.bfloat16), "a.bias": torch.randn(7),
            "c.scalar": torch.tensor(2.5, dtype=torch.float16), "d.ids": torch.arange(6, dtype=torch.int64)}


def test_written_tensor_by_tensor_reads_back_exactly(tmp_path):
    tensors = _tensors()
    path = tmp_path / "shard.safetensors"
    writer = ShardWriter(str(path), {k: torch.empty_like(t, device="meta") for k, t in tensors.items()})
    for key, t in tensors.items():
        writer.write(key, t)
    writer.finish()
    writer.close()
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt"}
        back = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is no dict
    assert back.keys() == tensors.keys()
    for key, t in tensors.items():
        assert back[key].dtype == t.dtype and torch.equal(back[key], t), key


def test_a_tensor_out_of_header_order_or_missing_is_an_error(tmp_path):
    tensors = _tensors()
    layout = {k: torch.empty_like(t, device="meta") for k, t in tensors.items()}
    writer = ShardWriter(str(tmp_path / "x.safetensors"), layout)
    with pytest.raises(ValueError, match="a.bias"):
        writer.write("a.bias", tensors["a.bias"])  # b.weight comes first
    writer.close()
    writer = ShardWriter(str(tmp_path / "y.safetensors"), layout)
    writer.write("b.weight", tensors["b.weight"])
    with pytest.raises(ValueError, match="ends without"):
        writer.finish()
    writer.close()
