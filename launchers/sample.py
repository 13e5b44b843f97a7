"""``advdit sample``: a sample set from a checkpoint, over all processes (numerics in
``advdit.trainer.evaluation.sampling``).

    advdit sample runs/x/checkpoints/step_00400000 --num-samples 50000 --sampler ddpm --steps 250 \\
        --cfg-scale 1.5 --npz samples/dit-xl2-cfg1.5.npz
    torchrun --standalone --nproc_per_node 8 -m advdit.launchers.cli sample CHECKPOINT --npz out.npz
"""

from __future__ import annotations

import argparse
from typing import Any

from .relaunch import relaunch

BALANCED = "balanced"


def add_sample_parser(commands: Any) -> argparse.ArgumentParser:
    """Register ``sample`` on an ``add_subparsers()`` object; returns its parser."""
    sample = commands.add_parser("sample", help="draw a sample set (PNGs and/or ADM .npz) from a checkpoint")
    sample.add_argument("source", help="a checkpoint folder, a file written by advdit export, or published "
                                       "DiT weights (official .pt, diffusers DiTTransformer2DModel folder)")
    sample.add_argument("--num-samples", type=int, default=50_000)
    sample.add_argument("--npz", help="write an ADM sample batch: arr_0 = N x H x W x 3 uint8, arr_1 labels")
    sample.add_argument("--png-dir", help="write one PNG per sample, 000000.png, 000001.png, ...")
    sample.add_argument("--weights", choices=("ema", "raw"), default="ema",
                        help="a checkpoint's EMA (default) or trained weights (of an official train.py "
                             "checkpoint: its 'ema' or 'model')")
    sample.add_argument("--sampler", choices=("ddpm", "ddim"),
                        help="default: the checkpoint's sample.sampler (not for DDGAN: NFE = its T)")
    sample.add_argument("--steps", type=int, help="sampling steps (DiT's published setting: ddpm 250)")
    sample.add_argument("--cfg-scale", type=float, help="classifier-free guidance (DiT's published: 1.5)")
    sample.add_argument("--cfg-channels", type=_channels, metavar="N|all",
                        help="eps channels guidance acts on (default: the checkpoint's sample.cfg_channels, "
                             "3 as the official DiT)")
    sample.add_argument("--labels", default=BALANCED,
                        help="'balanced' (sample i has class i mod num_classes) or a .npy / text file")
    sample.add_argument("--seed", type=int, default=0, help="sample i uses a generator seeded (seed, i)")
    sample.add_argument("--batch-size", type=int, default=64, help="per process")
    sample.add_argument("--vae", help="a local SD-VAE folder, if not where the checkpoint's config says")
    sample.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="of the denoiser (the VAE decodes in fp32)")
    sample.add_argument("--nproc", type=int, default=1, help="processes on this machine (one per GPU)")
    sample.set_defaults(func=_run)
    return sample


def _channels(text: str) -> int | str:
    """``--cfg-channels``: a count, or ``all``."""
    return text if text == "all" else int(text)


def _run(args: argparse.Namespace) -> int:
    from ..trainer.config import ConfigError
    from ..trainer.evaluation.sampling import (
        balanced_labels,
        load_sampler,
        read_labels,
        sampling_config,
        write_samples,
    )

    if (status := relaunch(args.nproc)) is not None:
        return status
    if not (args.npz or args.png_dir):
        raise ConfigError("advdit sample needs --npz PATH and/or --png-dir DIR")
    if args.num_samples < 1 or args.batch_size < 1:
        raise ConfigError("--num-samples and --batch-size must be positive")
    cfg = sampling_config(args.source, args.sampler, args.steps, args.cfg_scale, args.vae, args.precision,
                          cfg_channels=args.cfg_channels, weights=args.weights)
    sampler, accelerator = load_sampler(args.source, cfg, args.weights)
    labels = (balanced_labels(args.num_samples, cfg.model.num_classes) if args.labels == BALANCED
              else read_labels(args.labels, args.num_samples, cfg.model.num_classes))
    timing = write_samples(sampler, labels, args.seed, args.batch_size, cfg.data.image_size,
                           args.png_dir, args.npz)
    if accelerator.is_main_process:
        where = " and ".join(str(p) for p in (args.npz, args.png_dir) if p)
        setting = ("DDGAN, NFE = ddgan.num_steps" if cfg.objective == "ddgan" else
                   f"{cfg.sample.sampler} {cfg.sample.steps} steps, CFG {cfg.sample.cfg_scale} on "
                   f"{cfg.sample.cfg_channels} eps channels")
        print(f"wrote {args.num_samples} samples ({setting}, {args.weights} weights) to {where}; "
              f"{timing['images_per_sec']:.3f} images/s over {timing['processes']} process(es), "
              f"{timing['images_per_sec'] / timing['processes']:.3f} per process")
    return 0
