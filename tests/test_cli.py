import subprocess
import sys

import pytest

from medvl.cli import build_parser, main


@pytest.mark.parametrize("cmd", [[], ["preprocess"], ["demo-data"], ["serve"], ["convert"], ["export-projector"], ["train"],
                                 ["eval"], ["import-vqa"], ["pipeline"]])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    assert "usage: medvl" in capsys.readouterr().out


def test_flags_yaml_and_overrides_combine(tmp_path):
    from medvl.cli import _config_from_args
    from medvl.data.preprocess import PreprocessConfig

    recipe = tmp_path / "r.yaml"
    recipe.write_text("pre:\n  template: plain\n  image_size: 64\n  max_length: 100\n")
    args = build_parser().parse_args(["preprocess", "--config", str(recipe), "--section", "pre",
                                      "--image-size", "32", "max_length=300"])
    cfg = _config_from_args(PreprocessConfig, args)
    assert (cfg.template, cfg.image_size, cfg.max_length) == ("plain", 32, 300)


def test_missing_required_flag_is_a_clear_error():
    r = subprocess.run([sys.executable, "-m", "medvl.cli", "preprocess", "--data", "x.jsonl"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--image-root is required" in r.stderr
    assert "Traceback" not in r.stderr


def test_pipeline_unknown_recipe_key_is_a_clear_error(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("run: x\nstage1:\n  learning_rate: 1\n")
    r = subprocess.run([sys.executable, "-m", "medvl.cli", "pipeline", "--config", str(recipe)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "stage1.learning_rate" in r.stderr and "Traceback" not in r.stderr
