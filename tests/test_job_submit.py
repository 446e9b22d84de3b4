"""`ray job submit` against a head node started with `ray start --head` on this machine."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from urllib.request import urlopen

REPO = Path(__file__).parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_job_submit_to_a_local_head_node(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["DS_ACCELERATOR"] = "cpu"
    gcs, dashboard, metrics = _free_port(), _free_port(), _free_port()
    subprocess.run([BIN / "ray", "start", "--head", f"--port={gcs}", f"--dashboard-port={dashboard}",
                    "--dashboard-host=127.0.0.1", f"--metrics-export-port={metrics}", "--num-cpus=8",
                    "--include-dashboard=true", "--disable-usage-stats"],
                   check=True, env=env, capture_output=True, timeout=120)
    try:
        address = f"http://127.0.0.1:{dashboard}"
        job = subprocess.run(
            [BIN / "ray", "job", "submit", "--address", address, "--working-dir", str(REPO),
             "--runtime-env", str(REPO / "launch" / "runtime_env.yaml"), "--",
             "python", "-m", "egrpo.cli", "train", "launch/configs/toy-egrpo.yaml",
             "--set", "train.iterations=2", "--set", "train.eval_prompts=4", "--set", "plan.prompts_per_iteration=2",
             "--set", f"run.dir={tmp_path}", "--set", "run.wandb=disabled"],
            env=env, capture_output=True, text=True, timeout=600,
        )
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in job.stdout.lower()
        records = [json.loads(x) for x in (tmp_path / "toy-egrpo" / "metrics.jsonl").read_text().splitlines()]
        assert [r["iteration"] for r in records] == [0, 1, 2]
        # the dashboard lists the actors by role name
        with urlopen(f"{address}/api/v0/actors?limit=100", timeout=30) as response:
            listing = json.loads(response.read())
        names = {a.get("name") for a in listing["data"]["result"]["result"]}
        assert {"scheduler", "rollout-0", "rollout-1", "reward-0", "learner-0"} <= names
    finally:
        subprocess.run([BIN / "ray", "stop", "--force"], env=env, capture_output=True, timeout=120)
