"""The pipeline summary's stage table."""

from medvl.summary import summary_markdown


def test_stage_table_has_last_and_best_val_loss_or_dashes():
    stages = {"stage1": {"steps": 30, "first_loss": 5.0, "last_loss": 2.0, "last_val_loss": None},
              "stage2": {"steps": 50, "first_loss": 4.0, "last_loss": 1.5, "last_val_loss": 1.9,
                         "best_val_loss": 1.8, "best_val_step": 40}}
    md = summary_markdown({"run": "r", "recipe": "x.yaml", "steps": {}, "data": {}, "stages": stages,
                           "eval": None, "sample": None, "plots": []})
    assert "| stage1 | 30 | 5.000 | 2.000 | - | - |" in md
    assert "| stage2 | 50 | 4.000 | 1.500 | 1.900 | 1.800 (40) |" in md
