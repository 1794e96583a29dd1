"""Every shipped recipe loads, whole, into its typed configs, with ${run} expanded."""

from pathlib import Path

import pytest

from medvl import config
from medvl.pipeline import load_recipe
from medvl.train.config import TrainConfig

RECIPES = sorted(Path(__file__).parents[1].glob("workflows/configs/*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_loads(recipe):
    r = load_recipe(str(recipe))
    assert r.stage1.stage == 1 and r.stage2.stage == 2
    assert (r.stage1.zero_stage, r.stage2.zero_stage) == (2, 3)  # the paper's ZeRO stages
    assert r.stage2.init == f"{r.run}/stage1/hf" and r.stage1.data == r.preprocess_alignment.output
    assert r.eval.model == f"{r.run}/stage2/hf"
    assert "${run}" not in str(r)
    # a single section, as `medvl train --config RECIPE --stage 1` reads it, agrees
    assert config.load(TrainConfig, str(recipe), section="stage1") == r.stage1


def test_output_moves_the_whole_run(tmp_path):
    r = load_recipe(str(RECIPES[0]), str(tmp_path / "elsewhere"))
    assert r.stage1.output == f"{tmp_path}/elsewhere/stage1"
