"""Every section of every shipped recipe loads into its typed config."""

from pathlib import Path

import pytest
import yaml

from medvl import config
from medvl.data.preprocess import PreprocessConfig
from medvl.train.config import TrainConfig

RECIPES = sorted(Path(__file__).parents[1].glob("workflows/configs/*.yaml"))
KINDS = {"preprocess_alignment": PreprocessConfig, "preprocess_instruction": PreprocessConfig,
         "stage1": TrainConfig, "stage2": TrainConfig}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_sections_load(recipe):
    sections = yaml.safe_load(recipe.read_text())
    assert set(KINDS) <= set(sections)
    for name, cls in KINDS.items():
        cfg = config.load(cls, str(recipe), section=name)
        if cls is TrainConfig:
            assert cfg.stage == int(name[-1])
            assert cfg.zero_stage == (2 if cfg.stage == 1 else 3)  # the paper's ZeRO stages
