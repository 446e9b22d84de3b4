"""The `egrpo` command. Heavy imports happen inside each command, so config errors answer at once."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import textwrap
from pathlib import Path

from egrpo.config import ConfigError, load_config
from egrpo.integrity import RunDataError, guard_run_folder
from egrpo.models.families import FAMILIES


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="recipe YAML, e.g. launch/configs/toy-egrpo.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field, e.g. --set train.iterations=5 (repeatable)")


def check_input_files(cfg) -> None:
    """Missing, empty or malformed prompt files, a model.path that is no pipeline egrpo can load (no folder, no
    model_index.json, an unsupported pipeline class, a missing component: egrpo.models.folder) and reward
    folders their loaders would fail on (missing path or file, a tokenizer past its text model's vocabulary:
    egrpo.rewards.base.check_reward_folder) are config errors, one line naming the key and the path, found in
    seconds before any model loads or actor starts. No weights are read."""
    from egrpo.data.prompts import load_prompts
    from egrpo.models.folder import check_pipeline_folder
    from egrpo.rewards.base import NEEDS_WEIGHTS, check_reward_folder, reward_model_for

    for key, spec in (("data.prompts", cfg.data.prompts), ("data.eval_prompts", cfg.data.eval_prompts)):
        try:
            load_prompts(spec)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"{key}: {e}") from None
    if cfg.rewards.runtime_env:
        import yaml

        env_file = Path(cfg.rewards.runtime_env)
        if not env_file.is_file() or not isinstance(yaml.safe_load(env_file.read_text()), dict):
            raise ConfigError(f"rewards.runtime_env: {env_file} is not a YAML file with a runtime_env mapping")
    if cfg.model.path != "toy":  # the committed toy checkpoint is known to load
        try:
            check_pipeline_folder(cfg.model.path)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"model.path: {e}") from None
    for model in dict.fromkeys(reward_model_for(name) for name in cfg.rewards.weights):
        if model in NEEDS_WEIGHTS:
            try:
                check_reward_folder(model, cfg.rewards.paths.get(model))
            except (FileNotFoundError, ValueError) as e:  # already names rewards.paths.<model>; one line
                raise ConfigError(" ".join(str(e).split())) from None


def completed_run(cfg, checkpoint: Path, args: argparse.Namespace) -> str | None:
    """What to say when `checkpoint` already ends the run (its iteration is the last of train.iterations), so
    resuming would train nothing; None otherwise."""
    done = json.loads((checkpoint / "state.json").read_text())["iteration"] + 1
    if done < cfg.train.iterations:
        return None
    return (f"egrpo: the run is complete: checkpoint {checkpoint} ends iteration {done} of "
            f"train.iterations={cfg.train.iterations}; nothing was changed. To train further: egrpo train "
            f"{args.config} --resume {args.resume} --set train.iterations=N, with N > {done}")


def cmd_train(args: argparse.Namespace) -> int:
    """Train, or resume. All that guards the run folder happens before any model loads or actor starts: a fresh
    run into a folder that holds a run is refused (or, with --overwrite, the folder is moved aside); a resumed
    run's checkpoint is verified (egrpo.checkpoint.checkpoint_to_resume), and a run it already completes is left
    as it is."""
    cfg = load_config(args.config, args.overrides)
    check_input_files(cfg)
    resume = None
    if args.resume is None:
        guard_run_folder(cfg.run_dir, overwrite=args.overwrite)
    else:
        from egrpo.checkpoint import checkpoint_to_resume

        checkpoint = checkpoint_to_resume(cfg.run_dir, args.resume)
        complete = completed_run(cfg, checkpoint, args)
        if complete:
            print(complete)
            return 0
        resume = str(checkpoint)
    if cfg.runtime.backend == "local":
        from egrpo.trainer import Trainer
    else:
        from egrpo.runtime.driver import RayTrainer as Trainer

    outputs = Trainer(cfg, resume=resume).run()
    print(f"\nrun finished: {outputs.run_dir}")
    print(f"  reward curve   {outputs.reward_curve}")
    print(f"  sample grid    {outputs.sample_grid}")
    print(f"  metrics        {outputs.metrics}")
    print(f"  checkpoint     {outputs.checkpoint}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.memory:
        return _plan_memory(cfg, args)
    if args.gpu_memory is not None:
        raise ConfigError("--gpu-memory sizes a memory plan: add --memory")
    from egrpo.methods import branch_split_points, describe_schedule, plan_method

    info = describe_schedule(cfg)
    if plan_method(cfg).needs_probes:
        return _plan_aegpo(cfg, info, args)
    if cfg.plan.method == "branch":
        points = branch_split_points(cfg)
        info.update({"splits": points, "leaves": cfg.tree.factor ** len(points)})
        if not args.json:
            print(f"BranchGRPO plan: {cfg.sampler.steps} steps; each prompt's tree splits in {cfg.tree.factor} at "
                  f"steps {points} ({info['leaves']} leaves), {cfg.tree.between.upper()} between splits")
            return 0
    if args.json:
        print(json.dumps(info))
        return 0
    lengths = dict(zip(info["active_steps"], info["merge_lengths"], strict=True))
    s = cfg.sampler
    schedule = f"shift {s.shift}" if info["schedule"] == "shift" else "the model pipeline's own schedule"
    print(f"E-GRPO plan: {s.steps} steps, {schedule}, noise {s.noise} ({s.noise_level}), "
          f"tau {cfg.egrpo.tau} on exp(h)")
    print(f"{'step':>4} {'sigma':>7} {'h':>8} {'exp(h)':>7} {'active':>6} {'merge':>5} {'merged exp(h)':>13}")
    from egrpo.methods import noise_spec, schedule_sigmas
    from egrpo.sampling.steps import step_entropy

    sigmas = schedule_sigmas(cfg)
    for i, h in enumerate(info["step_entropy"]):
        length = lengths.get(i)
        merged = f"{math.exp(step_entropy(noise_spec(cfg), sigmas, i, length)):13.3f}" if length else ""
        print(f"{i:>4} {info['sigmas'][i]:7.4f} {h:8.4f} {math.exp(h):7.3f} "
              f"{'yes' if length else 'no':>6} {length or '':>5} {merged}")
    return 0


def _plan_memory(cfg, args: argparse.Namespace) -> int:
    """Peak GPU memory per role and what it is made of (egrpo.memory), from the architecture alone: no weights
    are read and no GPU is needed."""
    from egrpo.memory import DEFAULT_GPU_MEMORY_GB, memory_plan

    plan = memory_plan(cfg, args.gpu_memory or DEFAULT_GPU_MEMORY_GB)
    print(json.dumps(plan.to_json()) if args.json else plan.format())
    return 0


def _gigabytes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of GB per GPU, e.g. 80, got {text!r}")
    return value


def _plan_aegpo(cfg, info: dict, args: argparse.Namespace) -> int:
    """AEGPO's plan depends on the model: run the anchor pass with attention-entropy probes on one
    iteration's prompts (plan.prompts_per_iteration), under the current weights (base, or --checkpoint) and
    the reference, and show what the scheduler makes of it: E(t), dE, rollouts per prompt, peak steps."""
    check_input_files(cfg)
    from egrpo.checkpoint import load_checkpoint
    from egrpo.report import plot_entropy_curves
    from egrpo.sampling.rollout import probe_entropies
    from egrpo.scheduler import Scheduler
    from egrpo.trainer import load_policy, probe_settings, sampler_settings

    policy = load_policy(cfg)
    if args.checkpoint:
        load_checkpoint(args.checkpoint, policy)
    scheduler = Scheduler(cfg)
    requests = scheduler.draw(0)
    probes, _ = probe_entropies(policy, requests, sampler_settings(cfg), probe_settings(cfg), cfg.aegpo_peak_steps)
    scheduler.plan(0, probes)
    prompts = [r.prompt for r in requests]
    records = {p: scheduler.records[p] for p in prompts}  # what the scheduler decided, per prompt
    peaks = {p: r.peaks for p, r in records.items()}
    budgets = {p: r.budget for p, r in records.items()}
    info.update({
        "rollout": cfg.aegpo.rollout,
        "attention_entropy": dict(zip(prompts, probes.entropy.tolist(), strict=True)),
        "reference_entropy": dict(zip(prompts, probes.reference.tolist(), strict=True)),
        "delta_entropy": {p: r.dE[-1] for p, r in records.items()},
        "peaks": peaks,
        "budget": budgets,
    })
    tree = cfg.tree_plan
    if tree:  # a tree's split steps are its peaks; its leaves are its budget
        info.update({"splits": peaks, "leaves": budgets})
    # next to the checkpoint's run when there is one; a plan before training creates no run folder
    folder = Path(args.checkpoint) if args.checkpoint else Path(".")
    if folder.parent.name == "checkpoints":  # a checkpoint of a run: the run's folder, not the checkpoint's
        folder = folder.parent.parent
    png = Path(args.png or folder / "entropy_curves.png")
    plot_entropy_curves(info["attention_entropy"], info["reference_entropy"], peaks, png)
    if args.json:
        print(json.dumps(info))
        return 0
    a = cfg.aegpo
    explore = (f"a tree per prompt splitting in {cfg.tree.factor} at the highest peaks of E(t) (as many as its "
               f"budget's leaves need)" if tree else f"top-{a.peaks} peaks of E(t)")
    print(f"AEGPO plan at iteration 0 ({'checkpoint ' + args.checkpoint if args.checkpoint else 'base weights'}): "
          f"{cfg.sampler.steps} steps, {explore} in the first {cfg.aegpo_peak_steps} steps, "
          f"budget {a.budget}, merge {a.merge}")
    print(f"{'prompt':<32} {'dE':>8} {'leaves' if tree else 'rollouts':>8}  {'splits' if tree else 'peaks':<7} "
          f"E(t) per step")
    for prompt in prompts:
        curve = " ".join(f"{e:.4f}" for e in info["attention_entropy"][prompt])
        print(f"{textwrap.shorten(prompt, 32, placeholder='...'):<32} {info['delta_entropy'][prompt]:8.5f} {budgets[prompt]:>8}  "
              f"{str(peaks[prompt]):<7} {curve}")
    print(f"wrote {png}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Held-out evaluation of a checkpoint against the base model, on Ray (or in-process with
    runtime.backend=local): the same fixed seeds, every configured reward, a table and an image grid."""
    import dataclasses

    cfg = load_config(args.config, args.overrides)
    check_input_files(cfg)
    # an evaluation is a run of its own: it never writes into the training run's folder
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=cfg.run.name + "-eval", wandb="disabled"))
    from egrpo.checkpoint import verified_checkpoint
    from egrpo.report import save_image_grid, write_eval_table
    from egrpo.trainer import SHOWN_IMAGES

    checkpoint = verified_checkpoint(args.checkpoint, "--checkpoint")  # before any model loads
    if cfg.runtime.backend == "local":
        from egrpo.trainer import Trainer
    else:
        from egrpo.runtime.driver import RayTrainer as Trainer
    trainer = Trainer(cfg)
    try:
        base, base_images = trainer.evaluate()
        trainer.load_weights(checkpoint)
        tuned, tuned_images = trainer.evaluate()
    finally:
        trainer.close()
    out = Path(args.out) if args.out else cfg.run_dir
    out.mkdir(parents=True, exist_ok=True)
    table = write_eval_table(base, tuned, out / "eval.md", out / "eval.csv", checkpoint)
    shown = min(SHOWN_IMAGES, len(trainer.eval_prompts))
    save_image_grid([base_images[:shown], tuned_images[:shown]], ["base", checkpoint.name],
                    trainer.eval_prompts[:shown], out / "eval_grid.png")
    print(table)
    print(f"wrote {out / 'eval.md'}, {out / 'eval.csv'} and {out / 'eval_grid.png'}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    out = Path(args.out or f"runs/bench/{args.bench}")
    if args.bench == "algorithms":
        from egrpo.bench.algorithms import main as bench_algorithms

        return bench_algorithms(quick=args.quick, seeds=args.seeds, out=out)
    if args.bench == "probe":
        from egrpo.bench.probe import main as bench_probe

        return bench_probe(quick=args.quick, out=out)
    if args.bench == "scale":
        from egrpo.bench.scale import main as bench_scale

        return bench_scale(quick=args.quick, out=out, device=args.device, dtype=args.dtype)
    from egrpo.bench.system import main as bench_system

    return bench_system(quick=args.quick, gpu=args.gpu, out=out)


def cmd_sample(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    check_input_files(cfg)
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
    rows.append(run_plan(policy, plan, sampler_settings(cfg)).samples["images"])  # freshly loaded: the base
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


def cmd_tiny(args: argparse.Namespace) -> int:
    """Write a tiny random pipeline of a model family in diffusers' layout (the tests' own builders)."""
    out = Path(args.dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        print(f"egrpo: {out} exists and is not an empty folder; choose another (nothing was written)",
              file=sys.stderr)
        return 2
    from egrpo.models.families import policy_class
    from egrpo.models.tiny import save_pipeline

    family = policy_class(args.family)
    pipe = family.tiny_pipeline(seed=args.seed)
    save_pipeline(pipe, out, **family.tiny_settings)
    params = sum(p.numel() for p in pipe.transformer.parameters())
    print(f"wrote a tiny {type(pipe).__name__} ({type(pipe.transformer).__name__}, {params:,} parameters, "
          f"random weights, seed {args.seed}) to {out}; try it with any toy recipe: "
          f"egrpo train launch/configs/toy-egrpo.yaml --set model.path={out}")
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
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH|auto",
                       help="continue from a checkpoint folder, or the run's newest intact checkpoint (auto)")
    start.add_argument("--overwrite", action="store_true",
                       help="start over in a run folder that holds a run: the old folder is renamed to "
                            "<run dir>.old-<time> first (nothing is deleted)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("plan", help="show which steps explore: E-GRPO's step entropies and merge lengths; for "
                                    "aegpo also the attention entropy E(t), dE, rollouts per prompt and peaks")
    _add_config_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--checkpoint", help="aegpo: probe these weights instead of the base model's")
    p.add_argument("--png", help="aegpo: where to write the entropy curves (default: entropy_curves.png in the "
                                 "--checkpoint folder, else in the current folder)")
    p.add_argument("--memory", action="store_true",
                   help="instead: peak GPU memory of each role (rollout, learner, reward) and its parts")
    p.add_argument("--gpu-memory", type=_gigabytes, metavar="GB",
                   help="with --memory: GB of memory per GPU (default 80, the recipes' GPUs)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("eval", help="held-out rewards of a checkpoint against the base model: table and grid")
    _add_config_args(p)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, or a run folder (its latest)")
    p.add_argument("--out", help="output folder (default: <run dir>-eval)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="benchmarks: sample efficiency (algorithms), system efficiency (system), "
                                     "what AEGPO's entropy probe needs (probe), or a real-width rehearsal of full "
                                     "fine-tuning with checks (scale)")
    p.add_argument("bench", choices=["algorithms", "system", "probe", "scale"])
    p.add_argument("--quick", action="store_true", help="the smallest setting (under two minutes on 2 cores)")
    p.add_argument("--seeds", type=int, default=None, help="algorithms: seeds per method")
    p.add_argument("--gpu", action="store_true", help="system: also measure a FLUX-sized transformer on CUDA")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="scale: where the actors run")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="scale: one run in this dtype (default: float32 and bfloat16 on the CPU, --quick float32; "
                        "bfloat16 on CUDA)")
    p.add_argument("--out", help="output folder (default: runs/bench/<bench>)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("sample", help="draw images for prompts, base model and optionally a checkpoint")
    _add_config_args(p)
    p.add_argument("--checkpoint", help="checkpoint folder or run folder")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples.png")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("tiny", help="write a tiny random pipeline of a model family (the real classes, diffusers' "
                                    "layout) to smoke-test a cluster without downloading the real model")
    p.add_argument("family", choices=list(FAMILIES), help="model family")
    p.add_argument("dir", help="folder to write (must not exist, or be empty)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.set_defaults(func=cmd_tiny)

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
    except RunDataError as e:  # going on would lose data: an existing run folder, a damaged checkpoint
        print(f"egrpo: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:  # a path the user gave: model folder, checkpoint, --resume
        print(f"egrpo: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
