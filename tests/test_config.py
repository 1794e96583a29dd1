from dataclasses import dataclass, field
from typing import Literal

import pytest

from medvl import config


@dataclass
class Inner:
    lr: float = 1e-3
    zero: Literal[2, 3] = 2


@dataclass
class Outer:
    name: str = "x"
    steps: int = 1
    inner: Inner = field(default_factory=Inner)


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("stage1:\n  name: a\n  inner: {lr: 2}\n")
    cfg = config.load(Outer, str(p), ["steps=5", "inner.zero=3"], section="stage1")
    assert cfg == Outer("a", 5, Inner(2.0, 3))


@pytest.mark.parametrize("override, msg", [
    ("nope=1", "unknown config keys"), ("steps=abc", "expected int"),
    ("inner.zero=1", "not one of"), ("steps", "key=value"),
])
def test_bad_config_is_a_clear_error(override, msg):
    with pytest.raises(ValueError, match=msg):
        config.load(Outer, None, [override])
