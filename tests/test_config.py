from pathlib import Path

import pytest

from smat_dist.config import ConfigError, RunConfig, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_yaml_and_dotlist_compose_in_that_order(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("model:\n  gates:\n    num_experts: 4\ntrain:\n  seed: 7\n")
    cfg = load_config(RunConfig, [y], ["train.seed=9", "model.teacher.lr=0.1"])
    assert cfg.model.gates.num_experts == 4  # YAML over default
    assert cfg.train.seed == 9  # dotlist over YAML
    assert cfg.model.teacher.lr == 0.1
    assert cfg.model.gates.target_sparsity == 0.9  # untouched default


def test_base_chains_are_followed(tmp_path):
    (tmp_path / "a.yaml").write_text("train:\n  seed: 1\n  run_name: a\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\ntrain:\n  run_name: b\n")
    cfg = load_config(RunConfig, [tmp_path / "b.yaml"])
    assert (cfg.train.seed, cfg.train.run_name) == (1, "b")


def test_unknown_key_is_one_error_naming_key_and_file(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("model:\n  gates:\n    num_expert: 4\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*num_expert"):
        load_config(RunConfig, [y])
    with pytest.raises(ConfigError, match=r"command line.*model\.nope"):
        load_config(RunConfig, [], ["model.nope=1"])


def test_wrong_type_is_an_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"train\.seed"):
        load_config(RunConfig, [], ["train.seed=abc"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(RunConfig, [], ["train.seed"])


def test_missing_file_and_base_cycle(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(RunConfig, [tmp_path / "nope.yaml"])
    (tmp_path / "x.yaml").write_text("_base_: y.yaml\n")
    (tmp_path / "y.yaml").write_text("_base_: x.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(RunConfig, [tmp_path / "x.yaml"])


# Sweep configs have their own schema (tests/ops/test_sweep.py loads them).
RUN_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml") if "sweeps" not in p.relative_to(CONFIGS).parts)


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_every_shipped_config_loads(path):
    load_config(RunConfig, [path])
