"""``d3sr train``: the command-line face of the ``training`` package (also the script ``accelerate launch`` runs)."""

from __future__ import annotations

import argparse


def add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a one-step SR model (one CPU, or several GPUs and nodes with accelerate launch)",
        description="Train with a method, a config (defaults < --preset < --config < --set) and a folder of HR images. "
        "Several processes: accelerate launch [--num_processes N] -m d3sr_cli.main train ...",
    )
    p.add_argument("--method", help="d3sr, osediff, tadsr, tsdsr (one-step SR), autoencoder, diffusion (a base of your own); "
                   "default: the config's method, else d3sr")
    p.add_argument("--preset", help="a shipped config, e.g. tiny (a tiny random model that trains on a CPU in minutes)")
    p.add_argument("--config", help="YAML config merged over the defaults and the preset")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one key, e.g. train.batch_size=8")
    p.add_argument("--data", help="folder of high-resolution training images (sets data.hr_dir)")
    p.add_argument("--max-steps", type=int, help="sets train.max_steps")
    p.add_argument("--output-dir", required=True, help="checkpoints, logs and the exported model.safetensors go here")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --output-dir")
    p.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> int:
    try:
        from training.config import load_config, method_named_in
        from training.methods import METHODS
        from training.trainer import Trainer
    except ImportError as err:
        raise ValueError(f"training needs the [train] extra ({err.name} is missing): pip install 'd3sr[train]'.") from None

    method = args.method or method_named_in(preset=args.preset, file=args.config) or "d3sr"
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {sorted(METHODS)}.")
    overrides = [f"method={method}", *args.set]
    if args.data is not None:
        overrides.append(f"data.hr_dir={args.data}")
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    config = load_config(
        preset=args.preset, file=args.config, overrides=overrides, method_defaults=METHODS[method].defaults, other_sections=tuple(METHODS)
    )
    trainer = Trainer(config, args.output_dir, resume=args.resume)
    status = trainer.train()
    if trainer.accelerator.is_main_process:
        if status == "finished":
            print(f"trained {config['train']['max_steps']} steps; model: {trainer.model_path}")
        else:
            print(f"stopped by SIGTERM; resume with --resume --output-dir {trainer.output_dir}")
    return 0
