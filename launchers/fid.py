"""``advdit fid``: FID and Inception Score of a sample set (numerics in ``advdit.trainer.evaluation.fid``).

    advdit fid samples.npz --reference VIRTUAL_imagenet256_labeled.npz \\
        --inception-weights /models/pt_inception-2015-12-05-6726825d.pth
    advdit fid samples.npz --reference data/imagenet256/val --nproc 8     # stats of the shards, cached
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .relaunch import relaunch


def add_fid_parser(commands: Any) -> argparse.ArgumentParser:
    """Register ``fid`` on an ``add_subparsers()`` object; returns its parser."""
    fid = commands.add_parser("fid", help="FID and IS of a sample set (.npz or PNGs) against a reference")
    fid.add_argument("samples", help="an .npz with arr_0 (N x H x W x 3 uint8) or a folder of PNGs")
    fid.add_argument("--reference", required=True,
                     help="an ADM reference batch (VIRTUAL_imagenet256_labeled.npz), a file of --save-stats, "
                          "or image shards (statistics computed once and cached)")
    fid.add_argument("--inception-weights", help="pt_inception-2015-12-05-6726825d.pth "
                                                 "(default: $ADVDIT_INCEPTION_WEIGHTS)")
    fid.add_argument("--feature-net", help="a feature network spec JSON instead of the TF Inception-v3")
    fid.add_argument("--num-samples", type=int, help="use the first N samples (default: all)")
    fid.add_argument("--batch-size", type=int, default=100, help="per process")
    fid.add_argument("--workers", type=int, default=2, help="decoding processes for reference shards")
    fid.add_argument("--cache-dir", default="~/.cache/advdit/fid", help="for statistics of shards")
    fid.add_argument("--save-stats", help="write the set's mu and sigma (an .npz usable as --reference)")
    fid.add_argument("--json", help="write the results as JSON")
    fid.add_argument("--nproc", type=int, default=1, help="processes on this machine (one per GPU)")
    fid.set_defaults(func=_run)
    return fid


def _run(args: argparse.Namespace) -> int:
    from ..trainer.config import Config
    from ..trainer.evaluation.fid import load_spec, sample_set_fid
    from ..trainer.runtime.engines import make_accelerator

    if (status := relaunch(args.nproc)) is not None:
        return status
    accelerator = make_accelerator(Config())  # the process group and this rank's device
    result, _ = sample_set_fid(args.samples, args.reference, args.inception_weights, args.feature_net,
                               args.num_samples, args.batch_size, args.cache_dir, args.workers,
                               accelerator.device, args.save_stats)
    if not accelerator.is_main_process:
        return 0
    network = load_spec(args.feature_net).name
    print(f"FID {result.fid:.4f}  IS {result.inception_score:.3f} +- {result.inception_score_std:.3f}  "
          f"({result.num_samples} samples of {args.samples} vs {args.reference}; {network})")
    if args.json:
        record = {**result.as_dict(), "samples": args.samples, "reference": args.reference,
                  "feature_net": network}
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return 0
