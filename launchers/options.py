"""Command-line options that several ``advdit`` commands share."""

from __future__ import annotations

import argparse


def add_config_option(parser: argparse.ArgumentParser, relative_to: str = "this folder") -> None:
    """``--config``, repeatable: config files (or preset names) applied in order, later ones first
    overriding earlier ones, then the command's key=value overrides."""
    parser.add_argument(
        "--config", action="append", default=[], metavar="FILE|PRESET",
        help=f"a YAML config file (relative to {relative_to}) or the name of a preset shipped with "
             "advdit, e.g. imagenet/base (an unknown name lists them); repeatable: later ones "
             "override earlier ones (default: built-in defaults)")
