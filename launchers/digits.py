"""``advdit digits classifier | score``: the digits domain's fixed evaluator (numerics in
``advdit.trainer.evaluation.digits``).

    advdit data digits --out data/digits
    advdit digits classifier --data data/digits --out models/digits
    advdit digits score samples.npz --data data/digits --classifier models/digits/digits-classifier.json
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_digits_parser(commands: Any) -> argparse.ArgumentParser:
    """Register ``digits`` on an ``add_subparsers()`` object; returns its parser."""
    digits = commands.add_parser("digits", help="the digits evaluator: train its classifier, score samples")
    actions = digits.add_subparsers(dest="digits_command", required=True)
    classifier = actions.add_parser("classifier", help="train the fixed classifier on DATA/train (seeded)")
    classifier.add_argument("--data", default="data/digits", help="the folder of advdit data digits")
    classifier.add_argument("--out", default="models/digits", help="for its weights and spec JSON")
    classifier.add_argument("--seed", type=int, default=0)
    classifier.add_argument("--epochs", type=int, default=40)
    classifier.set_defaults(func=_classifier)
    score = actions.add_parser("score", help="FID, class consistency, precision and recall of samples")
    score.add_argument("samples", help="an ADM .npz (arr_0 images, arr_1 the labels they were drawn for)")
    score.add_argument("--data", default="data/digits", help="the folder of advdit data digits")
    score.add_argument("--classifier", default="models/digits/digits-classifier.json", help="its spec JSON")
    score.add_argument("--json", help="also write the scores here")
    score.set_defaults(func=_score)
    return digits


def _classifier(args: argparse.Namespace) -> int:
    from ..trainer.evaluation.digits import train_classifier

    spec, accuracy = train_classifier(args.data, args.out, args.seed, args.epochs)
    print(f"wrote {spec}; held-out accuracy {accuracy:.4f}")
    return 0


def _score(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from ..trainer.evaluation.digits import score_digits

    with np.load(args.samples) as batch:
        images = torch.from_numpy(batch["arr_0"]).permute(0, 3, 1, 2).contiguous()
        labels = torch.from_numpy(batch["arr_1"])
    scores = score_digits(images, labels, args.data, args.classifier).as_dict()
    print(" ".join(f"{key}={value:.4f}" for key, value in scores.items()))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(scores, handle, indent=2)
    return 0
