"""Jobs on a head node started with `ray start --head` on this machine: the README's `ray job submit`
command, `launch/submit.sh` following a toy job to success, and egrpo's `egrpo_*` gauges on the node's
Prometheus endpoint (`--metrics-export-port`).

One head node serves the module (starting one costs 10-20 s) and two toy jobs run on it (about 30 s each
here), the submit.sh one first, so that the endpoint holds only its gauges when it is read. `ray stop --force` at the end stops every Ray on the machine, so on a shared host run this file under
`flock /tmp/egrpo-ray.lock`.

What the metrics test relies on, measured with Ray 2.60: the BudgetScheduler's gauges reach the endpoint
within Ray's report interval (about 10 s) of being set, as `ray_egrpo_<key>` (type gauge, labels SessionName,
WorkerId, ...), and vanish about 20 s after the job, and with it the actor, ends. So the endpoint is polled
while the job runs and for a while after it.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from urllib.request import urlopen

import pytest
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).parents[1]
BIN = Path(sys.executable).parent
DASHBOARD = REPO / "cluster" / "grafana" / "egrpo-dashboard.json"
TOY_JOB = ["launch/configs/toy-egrpo.yaml", "--set", "train.iterations=2", "--set", "train.eval_prompts=4",
           "--set", "plan.prompts_per_iteration=2", "--set", "run.wandb=disabled"]
# Gauges the dashboard shows that the toy E-GRPO job does not set: AEGPO's entropy statistics, the probe's
# transformer calls, the weight-sync check (runtime.sync_check) and the held-out evaluation (published only
# in metrics.jsonl by the Ray driver for now).
NOT_IN_TOY_JOB = ("ray_egrpo_entropy_", "ray_egrpo_eval_", "ray_egrpo_nfe_probe", "ray_egrpo_sync_")


def metric_name(key: str) -> str:
    """The Prometheus name of a metrics.jsonl key: BudgetScheduler.publish's rule plus Ray's `ray_` prefix."""
    return "ray_egrpo_" + "".join(c if c.isalnum() else "_" for c in key)


def dashboard_metric_names() -> set[str]:
    """The metric names the Grafana dashboard's queries name exactly (not through a regex)."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return {m for p in panels for t in p.get("targets", []) for m in re.findall(r"\b(ray_egrpo_\w+)\{", t["expr"])}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> str:
    with urlopen(url, timeout=30) as response:
        return response.read().decode()


@pytest.fixture(scope="module")
def head():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["DS_ACCELERATOR"] = "cpu"
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # launch/submit.sh calls `ray`
    gcs, dashboard, metrics = _free_port(), _free_port(), _free_port()
    # --num-cpus=2: what the README's `ray start --head` declares on a 2-core laptop, whatever this machine has;
    # the ports are free ones so that a Ray already on 6379/8265 does not interfere
    subprocess.run([BIN / "ray", "start", "--head", f"--port={gcs}", f"--dashboard-port={dashboard}",
                    "--dashboard-host=127.0.0.1", f"--metrics-export-port={metrics}", "--num-cpus=2",
                    "--include-dashboard=true", "--disable-usage-stats"],
                   check=True, env=env, capture_output=True, timeout=120)
    try:
        yield SimpleNamespace(address=f"http://127.0.0.1:{dashboard}",
                              metrics_url=f"http://127.0.0.1:{metrics}/metrics", env=env)
    finally:
        subprocess.run([BIN / "ray", "stop", "--force"], env=env, capture_output=True, timeout=120)


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "toy-egrpo" / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def submitted(head, tmp_path_factory):
    """One toy job through launch/submit.sh (following it to the end), with the head's Prometheus endpoint
    polled every second while it runs and until egrpo's gauges showed up or 60 s after it ended."""
    run_dir = tmp_path_factory.mktemp("submit-sh")
    job_id = f"egrpo-test-{os.getpid()}"
    proc = subprocess.Popen(
        ["bash", str(REPO / "launch" / "submit.sh"), "--address", head.address, "--submission-id", job_id,
         *TOY_JOB, "--set", f"run.dir={run_dir}"],
        cwd=REPO, env=head.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    scrape, ended = None, None
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if ended is None and proc.poll() is not None:
            ended = time.monotonic()
        try:
            text = _get(head.metrics_url)
        except OSError:
            text = ""
        if metric_name("reward/mean") + "{" in text:
            scrape = text
            break
        if ended is not None and time.monotonic() - ended > 60:
            break
        time.sleep(1)
    try:
        output, _ = proc.communicate(timeout=max(1, deadline - time.monotonic()))
    finally:
        proc.kill()
    return SimpleNamespace(returncode=proc.returncode, output=output, job_id=job_id, run_dir=run_dir,
                           scrape=scrape, address=head.address)


def test_submit_script_follows_a_toy_job_to_success(submitted):
    out, address, job_id = submitted.output, submitted.address, submitted.job_id
    assert submitted.returncode == 0, out[-4000:]
    # it printed how to follow the job and where its dashboard is, then followed it to the end
    assert f"ray job logs --address {address} --follow {job_id}" in out
    assert f"{address}/#/jobs/{job_id}" in out
    assert "run finished:" in out  # the driver's last words, streamed by the follow
    assert f"egrpo job {job_id} succeeded" in out
    assert json.loads(_get(f"{address}/api/jobs/{job_id}"))["status"] == "SUCCEEDED"
    assert [r["iteration"] for r in _records(submitted.run_dir)] == [0, 1, 2]


def test_egrpo_gauges_are_exported_in_prometheus_format(submitted):
    assert submitted.scrape is not None, (
        f"{metric_name('reward/mean')} never appeared on the metrics endpoint during the job or 60 s after it:\n"
        + submitted.output[-2000:])
    families = {f.name: f for f in text_string_to_metric_families(submitted.scrape)}
    exported = {name for name in families if name.startswith("ray_egrpo_")}
    reward = families["ray_egrpo_reward_mean"]
    assert reward.type == "gauge"
    (sample,) = reward.samples  # one scheduler actor, one series
    assert sample.labels["SessionName"].startswith("session_")
    # its value is one the run logged (whichever iteration was last published when the endpoint was read)
    logged = [r["reward/mean"] for r in _records(submitted.run_dir) if "reward/mean" in r]
    assert any(math.isclose(sample.value, v, rel_tol=1e-6) for v in logged), (sample.value, logged)
    # every gauge the Grafana dashboard names exactly is exported, apart from those this job does not set
    expected = {n for n in dashboard_metric_names() if not n.startswith(NOT_IN_TOY_JOB)}
    assert expected <= exported, sorted(expected - exported)
    for key in ("images_per_s", "time/rollout", "time/learn", "staleness/max", "train/updates"):
        assert metric_name(key) in exported, key


def test_job_submit_to_a_local_head_node(head, tmp_path):
    """The README's command, verbatim apart from the address and the toy-sized overrides."""
    job = subprocess.run(
        [BIN / "ray", "job", "submit", "--address", head.address, "--working-dir", str(REPO),
         "--runtime-env", str(REPO / "launch" / "runtime_env.yaml"), "--",
         "python", "-m", "egrpo.cli", "train", *TOY_JOB, "--set", f"run.dir={tmp_path}"],
        env=head.env, capture_output=True, text=True, timeout=600,
    )
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "succeeded" in job.stdout.lower()
    assert [r["iteration"] for r in _records(tmp_path)] == [0, 1, 2]
    # the dashboard lists the actors by role name
    listing = json.loads(_get(f"{head.address}/api/v0/actors?limit=100"))
    names = {a.get("name") for a in listing["data"]["result"]["result"]}
    assert {"scheduler", "rollout-0", "rollout-1", "reward-0", "learner-0"} <= names
