"""Test-wide settings: offline, quiet, one thread per process (the CI machine has 2 cores)."""

import os

for key, value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "DS_ACCELERATOR": "cpu",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
}.items():
    os.environ.setdefault(key, value)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


class KernelAttention:
    """The (query, key) of every F.scaled_dot_product_attention call, (B, heads, N, d), as the kernel receives
    them: what diffusers' native attention backend and SD3's processor call."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._monkeypatch = monkeypatch

    def start(self) -> None:
        """Record every call from here on (until the test ends)."""
        import torch.nn.functional as F

        original = F.scaled_dot_product_attention

        def record(query, key, value, *args, **kwargs):
            self.calls.append((query.detach().clone(), key.detach().clone()))
            return original(query, key, value, *args, **kwargs)

        self._monkeypatch.setattr(F, "scaled_dot_product_attention", record)

    @staticmethod
    def entropy(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """(B,) mean over heads and rows of -sum p log p / log N, from the full float64 softmax."""
        import math

        scores = query.double() @ key.double().transpose(-1, -2) / math.sqrt(query.shape[-1])
        entropy = torch.special.entr(torch.softmax(scores, dim=-1)).sum(-1) / math.log(key.shape[2])
        return entropy.mean(dim=(1, 2)).float()


@pytest.fixture
def kernel_attention(monkeypatch: pytest.MonkeyPatch) -> KernelAttention:
    """The attention kernel's inputs once `start()`ed (the probe tests' ground truth), and their entropy."""
    return KernelAttention(monkeypatch)

class FileHeadings:
    """Names each test file as the suite enters it, with the time: a quiet run is otherwise minutes of dots."""

    def __init__(self, config) -> None:
        self.config = config
        self.current = ""

    def pytest_runtest_logstart(self, nodeid: str, location: tuple) -> None:
        import time

        path = nodeid.split("::")[0]
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if path != self.current and reporter is not None:
            self.current = path
            reporter.write_line(f"\n{time.strftime('%H:%M:%S')} {path}")


def pytest_configure(config) -> None:
    config.pluginmanager.register(FileHeadings(config), "egrpo-file-headings")


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray for one test module (RayTrainer's tests). Logical CPUs: the actors ask for up to 4.5; the 2
    real cores are shared by time."""
    import ray

    ray.init(address="local", num_cpus=8, include_dashboard=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
                                       "WANDB_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}})
    yield
    ray.shutdown()
