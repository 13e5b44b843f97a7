"""Data sets as webdataset shards: writing them (``writer``, with the ImageNet, latent and demo
sets in ``imagenet``, ``latents``, ``demo``; throughput in ``bench``) and streaming them to the
trainer (``manifest`` finds the shards, ``tar`` reads them, ``decode`` turns a sample into pixels
or latents, ``stream`` batches them resumably).

Here are the names the rest of the trainer uses; everything else is imported from its module.
"""

from .decode import decode_sample
from .errors import DataError
from .manifest import check_manifest, resolve_shards
from .stream import StreamSpec, build_loader, mirrored, next_batch, normalize_images
from .tar import iter_records

__all__ = ["DataError", "StreamSpec", "build_loader", "check_manifest", "decode_sample", "iter_records",
           "mirrored", "next_batch", "normalize_images", "resolve_shards"]
