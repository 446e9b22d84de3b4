"""What a run shows: metrics.jsonl (and wandb, offline by default), the reward-curve PNG and image grids."""

from __future__ import annotations

import json
import math
import os
import textwrap
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from egrpo.images import to_float_images, to_uint8_images  # noqa: E402


class MetricsLog:
    """Appends one JSON line per record to `metrics.jsonl`; mirrors it to wandb unless wandb is disabled."""

    def __init__(self, run_dir: Path, wandb_mode: str, config: dict[str, Any], resume: bool = False) -> None:
        self.path = run_dir / "metrics.jsonl"
        if not resume:
            self.path.write_text("")
        self.wandb = None
        if wandb_mode != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            self.wandb = wandb.init(project="egrpo", name=run_dir.name, dir=str(run_dir), mode=wandb_mode,
                                    config=config, reinit="finish_previous")

    def log(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))},
                           step=int(record.get("iteration", 0)))

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def plot_reward_curve(records: list[dict[str, Any]], path: Path, title: str,
                      weights: dict[str, float] | None = None) -> None:
    """Left: train reward per iteration and held-out (eval) reward where evaluated, both the weighted sum.
    Right, with `weights`: each reward component, held-out (solid) and train (faint), its weight in the label:
    a component that falls while the sum rises is what reward hacking looks like."""
    panels = 2 if weights else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    ax = axes[0][0]
    train = [(r["iteration"], r["reward/mean"]) for r in records if "reward/mean" in r]
    evals = [(r["iteration"], r["eval/reward_mean"]) for r in records if "eval/reward_mean" in r]
    if train:
        ax.plot(*zip(*train, strict=True), label="train rollouts (mean reward)", alpha=0.7)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="held-out prompts, ODE samples")
    ax.set_xlabel("iteration")
    ax.set_ylabel("reward (weighted sum)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    if weights:
        ax = axes[0][1]
        for k, (name, weight) in enumerate(weights.items()):
            colour = f"C{k % 10}"
            held_out = [(r["iteration"], r[f"eval/{name}"]) for r in records if f"eval/{name}" in r]
            trained = [(r["iteration"], r[f"reward/{name}"]) for r in records if f"reward/{name}" in r]
            if held_out:
                ax.plot(*zip(*held_out, strict=True), "o-", color=colour, label=f"{name} (weight {weight:g})")
            if trained:
                ax.plot(*zip(*trained, strict=True), color=colour, alpha=0.25)
        ax.set_xlabel("iteration")
        ax.set_ylabel("reward component (held-out: dots; train: faint)")
        ax.set_title("reward components", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


FALL_FRACTION = 0.1  # a component counts as falling when it lost 10% of its first value's size (at least 0.01)


def falling_components(records: list[dict[str, Any]], weights: dict[str, float]) -> list[str]:
    """Warnings for held-out reward components that ended lower than they started, and for train components of
    weight 0 that did: the optimised sum can rise while what it leaves out falls (reward hacking)."""
    warnings = []
    for name, weight in weights.items():
        for prefix, where in (("eval", "held-out"), ("reward", "train")):
            if prefix == "reward" and weight != 0:
                continue  # a trained component may trade off against another; its held-out value is checked
            values = [r[f"{prefix}/{name}"] for r in records if f"{prefix}/{name}" in r]
            if len(values) < 2:
                continue
            first, last = values[0], values[-1]
            if first - last > max(0.01, FALL_FRACTION * abs(first)):
                warnings.append(f"the {where} reward {name} (weight {weight:g}) fell from {first:.3f} to {last:.3f} "
                                "while training: check the samples for reward hacking")
    return warnings


def save_image_grid(rows: list[torch.Tensor], row_labels: list[str], captions: list[str], path: Path) -> None:
    """A grid with one row per tensor of images (N, 3, H, W), uint8 or float in [0, 1]; columns captioned by
    `captions`."""
    cols = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.3 * cols, 1.5 * len(rows) + 0.3), squeeze=False)
    for r, (images, label) in enumerate(zip(rows, row_labels, strict=True)):
        images = to_float_images(images)
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(images):
                ax.imshow(images[c].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            if r == 0 and c < len(captions):
                ax.set_title(_wrap(captions[c]), fontsize=6)
        axes[r][0].set_ylabel(label, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


START_IMAGES = "start_images.safetensors"  # in the run folder: the base model's row of samples.png


def save_start_images(path: Path, images: torch.Tensor, prompts: list[str]) -> None:
    """Keep the base model's held-out samples (the "start" row of samples.png) for the run's lifetime: a resumed
    run has only its checkpoint's weights and could not draw them again. uint8, with the prompts they show (as
    safetensors metadata); written to a temporary file and renamed."""
    from safetensors.torch import save_file

    images = images if images.dtype == torch.uint8 else to_uint8_images(images)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"images": images.contiguous().cpu()}, str(tmp), {"prompts": json.dumps(prompts)})
    os.replace(tmp, path)


def load_start_images(path: Path, prompts: list[str]) -> torch.Tensor | None:
    """The images `save_start_images` kept, or None when there are none (a run folder from before they were
    kept) or they show other prompts (the held-out prompts changed since: they would caption wrongly)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        if json.loads((f.metadata() or {}).get("prompts", "null")) != prompts:
            return None
        return f.get_tensor("images")


def _wrap(text: str, width: int = 16) -> str:
    words, lines, line = text.split(), [], ""
    for w in words:
        if line and len(line) + len(w) + 1 > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    return "\n".join([*lines, line])


def mean_or_nan(values: torch.Tensor) -> float:
    finite = values[torch.isfinite(values)]
    return float(finite.mean()) if len(finite) else math.nan


def plot_entropy_curves(
    entropy: dict[str, list[float]], reference: dict[str, list[float]], peaks: dict[str, list[int]], path: Path
) -> None:
    """AEGPO's local signal: E(t) per prompt (solid), the base policy's E_ref(t) (dashed, where it differs from
    E: before training the policy is its base and the two coincide, which the title then says), chosen
    exploration steps (dots)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    differs = False
    for k, prompt in enumerate(entropy):
        colour = f"C{k % 10}"
        curve = entropy[prompt]
        ax.plot(range(len(curve)), curve, "-", color=colour, label=textwrap.shorten(prompt, 40, placeholder="..."))
        if reference[prompt] != curve:
            differs = True
            ax.plot(range(len(curve)), reference[prompt], "--", color=colour, alpha=0.5)
        ax.plot(peaks[prompt], [curve[t] for t in peaks[prompt]], "o", color=colour, markersize=8)
    ax.set_xlabel("denoising step t")
    ax.set_ylabel("attention entropy E(t) (normalised)")
    base = "dashed: base policy" if differs else "the policy is its base policy: E_ref(t) = E(t)"
    ax.set_title(f"attention entropy along the anchor ({base}; dots: exploration steps)", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_eval_table(
    base: dict[str, float], tuned: dict[str, float], markdown: Path, csv: Path, checkpoint: Path
) -> str:
    """Base vs fine-tuned held-out rewards (the `eval/*` metrics) as a markdown table and a CSV; returns the
    markdown."""
    names = [k.removeprefix("eval/") for k in base]
    rows = [(n, base[f"eval/{n}"], tuned[f"eval/{n}"]) for n in names]
    lines = [f"| reward | base | {checkpoint.name} | change |", "|---|---|---|---|"]
    lines += [f"| {n} | {b:.4f} | {t:.4f} | {t - b:+.4f} |" for n, b, t in rows]
    table = "\n".join(lines)
    markdown.write_text(f"Held-out evaluation of `{checkpoint}`\n\n{table}\n")
    csv.write_text("reward,base,checkpoint,change\n" + "".join(f"{n},{b},{t},{t - b}\n" for n, b, t in rows))
    return table
