"""Write the flattened resolved config of each config file given as tests/data/<file stem>.json.

    python tests/data/freeze_config.py configs/imagenet256_dit_xl2_sadm.yaml ...

The JSON files pin what a recipe resolves to, so a rewrite of the recipes (or of the loader) that
changes any value fails tests/test_config.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from advdit.trainer.config import flatten, load_config

HERE = Path(__file__).resolve().parent


def freeze(path: Path) -> Path:
    out = HERE / f"{path.stem}.json"
    out.write_text(json.dumps(flatten(load_config(path)), indent=1, sort_keys=True) + "\n")
    return out


if __name__ == "__main__":
    for name in sys.argv[1:]:
        print(freeze(Path(name)))
