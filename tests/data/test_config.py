"""DataConfig as the ``data:`` section of a run config (OmegaConf structured config + YAML + dotlist)."""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from smat_dist.config import ConfigError, load_config
from smat_dist.data.config import DataConfig


@dataclass
class _Run:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)

    def validate(self) -> None:
        self.data.validate()


def test_embedded_yaml_and_overrides(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("data:\n  root: /data/md\n  train_sources: [a, b]\n  source_weights: [3, 1]\n"
                 "  episode:\n    num_ways: 10\n    num_support: 2\n    num_query: 10\n")
    cfg = load_config(_Run, [y], ["data.image_size=32", "data.episode.num_support_range=[1,5]"])
    assert cfg.data.root == "/data/md" and cfg.data.source_weights == [3.0, 1.0] and cfg.data.image_size == 32
    assert cfg.data.episode.num_ways == 10 and cfg.data.episode.num_support_range == [1, 5]
    assert math.isclose(cfg.data.episode.min_log_weight, math.log(0.5))
    assert cfg.data.transform.mean == [0.485, 0.456, 0.406] and cfg.data.augment is True


@pytest.mark.parametrize("override, message", [
    ("data.source_weights=[1,2]", "source_weights needs data.train_sources"),
    ("data.episode.num_support_range=[3,1]", "num_support_range"),
    ("data.episode.image_selection=md", "only 'independent'"),
    ("data.actor_cpus=-1", "actor_cpus"),
    ("data.nope=1", "nope"),
])
def test_bad_values_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_Run, [], [override])


def test_data_config_does_not_import_the_run_config():
    """smat_dist.config embeds DataConfig, so importing ours must not import it back (cycle)."""
    code = "import sys, smat_dist.data.config; assert 'smat_dist.config' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
