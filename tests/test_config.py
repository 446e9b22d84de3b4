"""Bad input stops before any work, names the key, exits 2 without a traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

from egrpo.config import ConfigError, from_dict, load_config, parse_overrides

RECIPES = sorted(Path(__file__).parents[1].joinpath("launch", "configs").glob("toy-*.yaml"))
EGRPO_RECIPE = Path(__file__).parents[1] / "launch" / "configs" / "toy-egrpo.yaml"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipes_load(recipe):
    cfg = load_config(recipe)
    assert cfg.run.name == recipe.stem


def test_overrides_are_typed_and_nested():
    cfg = load_config(RECIPES[0], ["sampler.steps=12", "egrpo.tau=3", "rewards.weights.toy_colour=2.5"])
    assert cfg.sampler.steps == 12 and cfg.egrpo.tau == 3.0 and isinstance(cfg.egrpo.tau, float)
    assert cfg.rewards.weights["toy_colour"] == 2.5
    assert load_config(RECIPES[0], ["train.lr=2e-3"]).train.lr == 2e-3  # YAML reads 2e-3 as a string
    assert parse_overrides(["a.b=true", "a.c=x"]) == {"a": {"b": True, "c": "x"}}


@pytest.mark.parametrize(
    "data,needle",
    [
        ({"train": {"iteratons": 3}}, "train.iteratons"),
        ({"trian": {}}, "trian"),
        ({"sampler": {"steps": "many"}}, "sampler.steps"),
        ({"sampler": {"steps": -4}}, "sampler.steps"),
        ({"plan": {"group_size": 1}}, "plan.group_size"),
        ({"egrpo": {"tau": 0}}, "egrpo.tau"),
        ({"egrpo": {"tau": -1.0}}, "egrpo.tau"),
        ({"sampler": {"noise": "brownian"}}, "sampler.noise"),
        ({"model": {"lora_targets": "to_q"}}, "model.lora_targets"),
    ],
)
def test_bad_values_name_the_key(data, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        from_dict(data)


def _egrpo(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "egrpo.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_cli_config_error_exits_2_without_traceback(tmp_path):
    result = _egrpo("train", str(RECIPES[0]), "--set", "train.iteratons=3")
    assert result.returncode == 2
    assert "train.iteratons" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()
    result = _egrpo("train", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2 and "nope.yaml" in result.stderr


def test_cli_missing_or_empty_prompts_file_names_the_path(tmp_path):
    missing = tmp_path / "prompts.txt"
    run_dir = tmp_path / "runs"
    result = _egrpo("train", str(RECIPES[0]), "--set", f"data.prompts={missing}", "--set", f"run.dir={run_dir}")
    assert result.returncode == 2 and str(missing) in result.stderr and "Traceback" not in result.stderr
    missing.write_text("\n  \n")
    result = _egrpo("train", str(RECIPES[0]), "--set", f"data.prompts={missing}", "--set", f"run.dir={run_dir}")
    assert result.returncode == 2 and str(missing) in result.stderr
    assert not run_dir.exists()  # nothing was started or written


def test_cli_plan_json_keys():
    import json

    result = _egrpo("plan", str(EGRPO_RECIPE), "--set", "sampler.steps=16", "--set", "egrpo.active_steps=8", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert {"sigmas", "step_entropy", "active_steps", "merge_lengths"} <= set(info)
    assert len(info["merge_lengths"]) == len(info["active_steps"]) == 8
    table = _egrpo("plan", str(EGRPO_RECIPE))
    assert table.returncode == 0 and "merge" in table.stdout and len(table.stdout.splitlines()) == 2 + 8
