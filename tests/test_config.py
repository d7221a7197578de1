import os
import subprocess
import sys
from pathlib import Path

import pytest

from smat_dist.config import ConfigError, RunConfig, load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


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


# ---------------------------------------------------------------- every section checks itself at load


@pytest.mark.parametrize("override, key", [
    ("model.gates.num_experts=0", "model.gates.num_experts"),
    ("model.gates.target_sparsity=1.5", "model.gates.target_sparsity"),
    ("model.gates.noise_scope=batch", "model.gates.noise_scope"),
    ("model.gates.zeta=0.9", "model.gates.zeta"),
    ("model.backbone.img_size=4", "model.backbone.img_size"),
    ("model.backbone.depth=0", "model.backbone.depth"),
    ("model.hypernet.pool=max", "model.hypernet.pool"),
    ("model.hypernet.temperature_min=0", "model.hypernet.temperature_min"),
    ("model.inner.lr=-1e-3", "model.inner.lr"),
    ("model.teacher.kd_weight=1.5", "model.teacher.kd_weight"),
    ("model.teacher.kl_direction=sideways", "model.teacher.kl_direction"),
    ("model.lagrangian.lr=-1", "model.lagrangian.lr"),
    ("model.optim.hypernet_betas=[0.9]", "model.optim.hypernet_betas"),
    ("model.optim.mask_clip=0", "model.optim.mask_clip"),
    ("model.optim.total_epochs=0", "model.optim.total_epochs"),
    ("model.precision=fp16", "model.precision"),
    ("train.tasks_per_step=0", "train.tasks_per_step"),
    ("train.log_every=0", "train.log_every"),
    ("train.keep_checkpoints=-1", "train.keep_checkpoints"),
    ("monitor.every=0", "monitor.every"),
    ("dist.zero_stage=3", "dist.zero_stage"),
])
def test_a_bad_setting_is_one_error_naming_its_key(override, key):
    with pytest.raises(ConfigError, match="^" + key.replace(".", r"\.") + " must be"):
        load_config(RunConfig, [], [override])


def test_sections_validate_when_built_in_code():
    """``SMAT(cfg)`` checks a config built without :func:`load_config` the same way."""
    from smat_dist.smat.config import GateConfig, ModelConfig
    from smat_dist.train.config import TrainConfig

    ModelConfig().validate()
    TrainConfig().validate()
    with pytest.raises(ConfigError, match=r"^model\.gates\.num_experts must be >= 1, got 0$"):
        ModelConfig(gates=GateConfig(num_experts=0)).validate()
    with pytest.raises(ConfigError, match=r"^x\.target_sparsity must be in \[0, 1\), got -0\.1$"):
        GateConfig(target_sparsity=-0.1).validate("x")
    with pytest.raises(ConfigError, match=r"^train\.max_steps"):
        TrainConfig(max_steps=-1).validate()


LAUNCHERS = {"python -m smat_dist.train": [sys.executable, "-m", "smat_dist.train"],
             "smat-train": [str(Path(sys.executable).with_name("smat-train"))]}


@pytest.mark.parametrize("prog", list(LAUNCHERS))
def test_launchers_reject_a_bad_model_setting_in_one_line_before_torch(prog, tmp_path):
    """Exit 2 with one line naming the key, from the launcher's real command line."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("RAY_ADDRESS", None)
    cmd = LAUNCHERS[prog] + ["--config", str(CONFIGS / "demo" / "smat.yaml"), "model.gates.num_experts=0"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.splitlines() == [f"{prog}: error: model.gates.num_experts must be >= 1, got 0"]
    assert proc.stdout == ""


@pytest.mark.parametrize("entry", ["main", "main_local"])
def test_the_config_check_imports_no_torch_or_ray(entry):
    code = (f"import sys; from smat_dist.train.cli import {entry}; "
            f"rc = {entry}(['--config', {str(CONFIGS / 'demo' / 'smat.yaml')!r}, 'model.gates.num_experts=0']); "
            "heavy = sorted(m for m in ('torch', 'ray', 'deepspeed') if m in sys.modules); "
            "print(rc, heavy)")
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(REPO)),
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "2 []", out.stdout + out.stderr


def test_pretrain_config_checks_its_backbone_and_schedule():
    from smat_dist.pretrain import PretrainConfig

    load_config(PretrainConfig, [], [])
    with pytest.raises(ConfigError, match=r"^backbone\.depth must be >= 1 or null, got 0$"):
        load_config(PretrainConfig, [], ["backbone.depth=0"])
    with pytest.raises(ConfigError, match=r"^label_smoothing must be in \[0, 1\)"):
        load_config(PretrainConfig, [], ["label_smoothing=1.0"])
