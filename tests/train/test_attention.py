"""The recipe's ``attn_implementation`` reaches every attention module of the training model
(towers loaded on their own included), is recorded with the run's config, and
flash_attention_2 where it cannot run stops at config time in one line."""

import importlib.util

import pytest
import yaml

from medvl import cli
from medvl.rerun import CONFIG_FILE
from medvl.train.config import TrainConfig
from medvl.train.model import build_model
from medvl.train.trainer import claim_output
from tests.train.test_model import _tiny_towers


def _kernels(model) -> dict[str, str]:
    """Attention module type -> the implementation its forward dispatches on (its config's)."""
    return {type(m).__name__: m.config._attn_implementation for m in model.modules()
            if type(m).__name__.endswith("Attention")}


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_every_attention_module_runs_the_configured_kernel(kernel, demo_dir, bpe_tokenizer, tmp_path):
    _tiny_towers(tmp_path, bpe_tokenizer)
    tokenizer = str(demo_dir / "tokenizer")
    for cfg in (TrainConfig(tokenizer=tokenizer, attn_implementation=kernel),  # tiny preset
                TrainConfig(tokenizer=tokenizer, vision_tower=str(tmp_path / "vit"), llm=str(tmp_path / "llm"),
                            attn_implementation=kernel)):
        model, _ = build_model(cfg)
        assert _kernels(model) == {"CLIPAttention": kernel, "LlamaAttention": kernel}


def test_default_is_sdpa_and_recorded_with_the_run(tmp_path):
    cfg = claim_output(TrainConfig(output=str(tmp_path)), resume=False, overwrite=False)
    assert cfg.attn_implementation == "sdpa"
    saved = yaml.safe_load((tmp_path / CONFIG_FILE).read_text())
    assert saved["attn_implementation"] == "sdpa"


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")
@pytest.mark.parametrize("flags, msg", [
    (["--no-use-gpu"], "GPU in bf16 only"),
    ([], "needs the flash-attn package"),  # the 13B recipe's stage 2 (GPU, bf16) as it is
])
def test_flash_attention_2_without_its_conditions_is_one_line_at_config_time(flags, msg, capsys):
    argv = ["train", "--config", "workflows/configs/qilin-13b.yaml", "--stage", "2",
            "--attn-implementation", "flash_attention_2", *flags]
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and msg in err and err.count("\n") == 1, err
