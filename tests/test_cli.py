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
    args = build_parser("preprocess").parse_args(["preprocess", "--config", str(recipe), "--section", "pre",
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


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medvl.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def one_line_error(r: subprocess.CompletedProcess, words: str) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and words in lines[0], r.stderr[-3000:]


def test_common_mistakes_are_one_line_before_ray_starts(tmp_path):
    """Each mistake: exit 2, one line on stderr, no traceback, and no Ray started (these
    would otherwise fail in a worker, after the cluster spun up)."""
    records = tmp_path / "r.jsonl"
    records.write_text("{}\n")
    one_line_error(cli("pipeline", "--config", str(tmp_path / "nope.yaml")), "no such recipe file")
    one_line_error(cli("preprocess", "--data", str(records), "--image-root", str(tmp_path), "--output",
                       str(tmp_path / "o"), "--tokenizer", str(tmp_path / "no-tok")),
                   f"tokenizer: {tmp_path / 'no-tok'} does not exist")
    one_line_error(cli("serve", "--model", str(tmp_path / "no-model")), "not an exported model directory")
    one_line_error(cli("train", "--data", str(tmp_path / "no-data"), "--output", str(tmp_path / "o")),
                   "no-data/manifest.json does not exist")
    one_line_error(cli("eval", "--model", str(tmp_path), "--data", str(records), "--image-root", str(tmp_path),
                       "--output", str(tmp_path / "o")), "model: ")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    one_line_error(cli("pipeline", "--config", str(bad)), "not valid YAML")
    assert not list(tmp_path.glob("**/session_*"))  # no Ray session anywhere


def test_s3_without_credentials_fails_in_seconds(tmp_path):
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true", AWS_ENDPOINT_URL="http://127.0.0.1:9")
    one_line_error(cli("train", "--data", "s3://bucket/data", "--output", str(tmp_path / "o"), env=env),
                   "s3://bucket/data/manifest.json: no AWS credentials found")


def test_numbers_are_strings_where_a_string_is_expected():
    from medvl.cli import _config_from_args
    from medvl.train.config import TrainConfig

    args = build_parser("train").parse_args(["train", "--output", "2024", "data=2025"])
    cfg = _config_from_args(TrainConfig, args)
    assert (cfg.output, cfg.data) == ("2024", "2025")


def test_top_level_help_and_version_load_no_heavy_library():
    code = ("import sys; from medvl.cli import main\n"
            "for argv in (['--help'], ['--version']):\n"
            "    try: main(argv)\n"
            "    except SystemExit: pass\n"
            "heavy = sorted(m for m in ('torch', 'ray', 'transformers', 'pyarrow') if m in sys.modules)\n"
            "print('heavy:', heavy)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "medvl 0." in r.stdout and "chat" in r.stdout and r.stdout.strip().endswith("heavy: []"), r.stdout
