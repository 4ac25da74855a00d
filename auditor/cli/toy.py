"""`auditor toy-model build DIR`: train (or reuse) the toy memorizing model; progress goes to the log (stderr)."""

from __future__ import annotations

import argparse
import json

EPILOG = """\
examples:
  auditor toy-model path                                   the full preset shipped with the package (no training)
  auditor toy-model path --family sd3                      the shipped flow-matching (SD3-shaped) toy
  auditor score --model "$(auditor toy-model path)" "a red cat sitting in a park"
  auditor toy-model build .cache/toy-model                 full preset from scratch (~9 min, one core)
  auditor toy-model build /tmp/toy --preset test --seed 1  small fast variant (the tests' fixture)
  auditor toy-model build .cache/toy-model --force         retrain even if a build is cached
  auditor toy-model build .cache/toy-sd3 --family sd3      the SD3-shaped (MMDiT, rectified flow) toy
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "toy-model",
        help="build the toy text-to-image model that memorizes known captions",
        description=(
            "A small latent diffusion model trained here on CPU (no downloads) that memorizes captions with known "
            "trigger words, saved as a diffusers Stable Diffusion folder with a manifest of its captions."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    actions = parser.add_subparsers(dest="toy_action", metavar="ACTION", required=True)
    path = actions.add_parser(
        "path",
        help="print the folder of the toy model shipped with the package (full preset, seed 0)",
        allow_abbrev=False,
    )
    path.add_argument(
        "--family",
        default="sd",
        choices=["sd", "sd3"],
        help="sd: the DDPM toy (StableDiffusionPipeline); sd3: the flow-matching toy (StableDiffusion3Pipeline)",
    )
    path.set_defaults(handler=run_path)
    build = actions.add_parser(
        "build", help="train the toy model into DIR, or reuse a complete build there", allow_abbrev=False
    )
    build.add_argument(
        "dir", metavar="DIR", help="output folder (a diffusers StableDiffusionPipeline folder)"
    )
    build.add_argument(
        "--family",
        default="sd",
        choices=["sd", "sd3"],
        help="sd: StableDiffusionPipeline (UNet, DDPM epsilon); sd3: StableDiffusion3Pipeline (tiny MMDiT, "
        "rectified flow, two CLIPs, no T5) (default sd)",
    )
    build.add_argument(
        "--preset", default="full", choices=["full", "test"], help="size preset (default full)"
    )
    build.add_argument(
        "--seed", type=int, default=0, help="seed of data, initialisation and training (default 0)"
    )
    build.add_argument(
        "--force", action="store_true", help="retrain and replace DIR even if a build is there"
    )
    build.add_argument(
        "--no-check", action="store_true", help="skip the DDIM check that memorized captions are reproduced"
    )
    build.add_argument(
        "--filter-threshold",
        type=float,
        default=None,
        help="train with the paper's training-time mitigation: drop samples whose text-conditional magnitude "
        ">= this (needs auditor.training.MagnitudeFilter)",
    )
    build.add_argument(
        "--log-every", type=int, default=100, help="log loss and ETA every N steps (default 100)"
    )
    build.set_defaults(handler=run_build)


def run_path(args: argparse.Namespace) -> int:
    from auditor.toy.shipped import shipped_model_dir

    print(shipped_model_dir(args.family))
    return 0


def run_build(args: argparse.Namespace) -> int:
    if args.family == "sd3":
        return run_build_flow(args)
    from auditor.toy.train import build_toy_model

    model_dir, info = build_toy_model(
        args.dir,
        args.preset,
        seed=args.seed,
        force=args.force,
        check=not args.no_check,
        log_every=args.log_every,
        filter_threshold=args.filter_threshold,
    )
    print(f"toy model: {model_dir}  (preset {info['preset']}, trained in {info['train_seconds']:.0f}s)")
    check = info.get("memorization_check")
    if check:
        print(
            f"memorization check (DDIM {check['ddim_steps']} steps, CFG {check['guidance_scale']}): cosine to the "
            f"training latent: memorized mean {check['memorized_cosine_mean']:.3f} (min "
            f"{check['memorized_cosine_min']:.3f}, {check['memorized_reproduced_fraction']:.0%} > 0.9) vs seen-once "
            f"mean {check['seen_once_cosine_mean']:.3f} (max {check['seen_once_cosine_max']:.3f})"
        )
    print(f"manifest: {model_dir / 'toy_manifest.json'}; build record: {model_dir / 'toy_build.json'}")
    print(f"next: auditor evaluate --model {model_dir}")
    if args.verbose:
        print(json.dumps(info, indent=1))
    return 0


def run_build_flow(args: argparse.Namespace) -> int:
    from auditor.errors import ConfigError
    from auditor.toy.flow import build_flow_toy_model
    from auditor.toy.flow_check import format_flow_check

    if args.filter_threshold is not None:
        raise ConfigError(
            f"--filter-threshold {args.filter_threshold} is for the sd family only; drop it or pass --family sd."
        )
    model_dir, info = build_flow_toy_model(
        args.dir,
        args.preset,
        seed=args.seed,
        force=args.force,
        check=not args.no_check,
        log_every=args.log_every,
    )
    print(
        f"toy model (StableDiffusion3Pipeline): {model_dir}  (preset {info['preset']}, trained in "
        f"{info['train_seconds']:.0f}s)"
    )
    if info.get("flow_check"):
        print(format_flow_check(info["flow_check"]))
    print(f"manifest: {model_dir / 'toy_manifest.json'}; build record: {model_dir / 'toy_build.json'}")
    if args.verbose:
        print(json.dumps(info, indent=1))
    return 0
