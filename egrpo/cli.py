"""The `egrpo` command. Heavy imports happen inside each command, so config errors answer at once."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

from egrpo.config import ConfigError, load_config


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="recipe YAML, e.g. launch/configs/toy-egrpo.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field, e.g. --set train.iterations=5 (repeatable)")


def check_input_files(cfg) -> None:
    """Missing, empty or malformed prompt files, a missing model folder and missing reward weights are config
    errors (naming the key and the path), found before any model loads or actor starts."""
    from egrpo.data.prompts import load_prompts
    from egrpo.rewards.base import NEEDS_WEIGHTS, reward_model_for, weights_path

    for key, spec in (("data.prompts", cfg.data.prompts), ("data.eval_prompts", cfg.data.eval_prompts)):
        try:
            load_prompts(spec)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"{key}: {e}") from None
    if cfg.model.path != "toy" and not Path(cfg.model.path).expanduser().is_dir():
        raise ConfigError(f"model.path: {cfg.model.path} is not a folder (a local diffusers pipeline)")
    for model in dict.fromkeys(reward_model_for(name) for name in cfg.rewards.weights):
        if model in NEEDS_WEIGHTS:
            try:
                weights_path(model, cfg.rewards.paths.get(model))
            except (FileNotFoundError, ValueError) as e:
                raise ConfigError(str(e)) from None


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    check_input_files(cfg)
    if cfg.runtime.backend == "local":
        from egrpo.trainer import Trainer
    else:
        from egrpo.runtime.driver import RayTrainer as Trainer

    outputs = Trainer(cfg, resume=args.resume).run()
    print(f"\nrun finished: {outputs.run_dir}")
    print(f"  reward curve   {outputs.reward_curve}")
    print(f"  sample grid    {outputs.sample_grid}")
    print(f"  metrics        {outputs.metrics}")
    print(f"  checkpoint     {outputs.checkpoint}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from egrpo.sampling.plans import describe_schedule

    info = describe_schedule(cfg)
    if args.json:
        print(json.dumps(info))
        return 0
    lengths = dict(zip(info["active_steps"], info["merge_lengths"], strict=True))
    s = cfg.sampler
    print(f"E-GRPO plan: {s.steps} steps, shift {s.shift}, noise {s.noise} ({s.noise_level}), "
          f"tau {cfg.egrpo.tau} on exp(h)")
    print(f"{'step':>4} {'sigma':>7} {'h':>8} {'exp(h)':>7} {'active':>6} {'merge':>5} {'merged exp(h)':>13}")
    from egrpo.sampling.plans import noise_spec
    from egrpo.sampling.steps import sigma_schedule, step_entropy

    sigmas = sigma_schedule(s.steps, s.shift)
    for i, h in enumerate(info["step_entropy"]):
        length = lengths.get(i)
        merged = f"{math.exp(step_entropy(noise_spec(cfg), sigmas, i, length)):13.3f}" if length else ""
        print(f"{i:>4} {info['sigmas'][i]:7.4f} {h:8.4f} {math.exp(h):7.3f} "
              f"{'yes' if length else 'no':>6} {length or '':>5} {merged}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from egrpo.checkpoint import load_checkpoint
    from egrpo.report import save_image_grid
    from egrpo.rewards.base import score_all
    from egrpo.sampling.plans import ode_plan
    from egrpo.sampling.rollout import run_plan
    from egrpo.trainer import load_policy, load_reward_models, sampler_settings

    policy = load_policy(cfg)
    rows, labels = [], []
    prompts = args.prompt
    seeds = [args.seed + k for k in range(len(prompts))]
    plan = ode_plan(prompts, seeds, cfg.sampler.steps)
    with policy.reference():
        rows.append(run_plan(policy, plan, sampler_settings(cfg)).samples["images"])
        labels.append("base")
    if args.checkpoint:
        state = load_checkpoint(args.checkpoint, policy)
        rows.append(run_plan(policy, plan, sampler_settings(cfg)).samples["images"])
        labels.append(f"iter {state['iteration'] + 1}")
    out = Path(args.out)
    save_image_grid(rows, labels, prompts, out)
    try:
        models = load_reward_models(cfg)
        for label, images in zip(labels, rows, strict=True):
            scores = score_all(models, images, prompts)
            total = sum(w * scores[n] for n, w in cfg.rewards.weights.items())
            print(f"{label:>10}: reward per prompt {[round(float(x), 3) for x in total]}")
    except ValueError as e:  # prompts a reward model cannot read (e.g. non-toy prompts for toy rewards)
        print(f"(no reward scores: {e})")
    print(f"wrote {out}")
    return 0


def cmd_toy_pretrain(args: argparse.Namespace) -> int:
    from egrpo.toyworld.pretrain import pretrain

    pretrain(Path(args.out), steps=args.steps, seed=args.seed, pull_to_centre=args.pull_to_centre, dim=args.dim)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="egrpo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train with the recipe (on Ray; runtime.backend=local: in-process loop)")
    _add_config_args(p)
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH|auto",
                   help="continue from a checkpoint folder, or the run's latest (auto)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("plan", help="show the E-GRPO step entropies and merge lengths for a recipe")
    _add_config_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("sample", help="draw images for prompts, base model and optionally a checkpoint")
    _add_config_args(p)
    p.add_argument("--checkpoint", help="checkpoint folder or run folder")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples.png")
    p.set_defaults(func=cmd_sample)

    toy = sub.add_parser("toy", help="the CPU toy world").add_subparsers(dest="toy_command", required=True)
    p = toy.add_parser("pretrain", help="rebuild the toy text-to-image checkpoint by flow matching")
    p.add_argument("--out", default=str(Path(__file__).parent / "toyworld" / "checkpoint"))
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--pull-to-centre", type=float, default=0.5,
                   help="training shapes sit up to this fraction of the way from their quadrant to the centre")
    p.add_argument("--dim", type=float, default=0.45,
                   help="training shapes are drawn at a random (1 - dim) to 100%% of their palette intensity")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_toy_pretrain)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"egrpo: config error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if type(e).__name__ != "ClusterError":  # imported lazily with Ray; anything else is a bug
            raise
        print(f"egrpo: {e}", file=sys.stderr)
        return 3
    except FileNotFoundError as e:  # a path the user gave: model folder, checkpoint, --resume
        print(f"egrpo: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
