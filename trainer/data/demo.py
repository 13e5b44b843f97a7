"""The demo data set: 10 classes of procedurally drawn coloured shapes, written as shards.

Each class is one shape in one colour; position, size, rotation, background shade and a little
colour jitter vary per image, so a small DiT has something to learn in a few CPU minutes and its
samples are easy to judge by eye. Images are drawn at 4x and downsampled for anti-aliased edges.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw
from tqdm import tqdm

from .writer import ShardWriter, encode_png

CLASSES = (
    ("circle", (230, 60, 50)),
    ("square", (60, 190, 80)),
    ("triangle", (60, 110, 235)),
    ("cross", (240, 210, 50)),
    ("ring", (210, 70, 210)),
    ("diamond", (60, 210, 220)),
    ("bar", (245, 140, 40)),
    ("stripes", (235, 235, 235)),
    ("dots", (150, 90, 230)),
    ("star", (160, 230, 60)),
)
SUPERSAMPLE = 4


def _polygon(cx: float, cy: float, radius: float, corners: int, angle: float,
             inner: float | None = None) -> list[tuple[float, float]]:
    """A regular polygon, or a star when ``inner`` (the inner radius ratio) is given."""
    points = []
    steps = corners * 2 if inner else corners
    for i in range(steps):
        r = radius * (inner if inner and i % 2 else 1.0)
        theta = angle + 2 * math.pi * i / steps
        points.append((cx + r * math.cos(theta), cy + r * math.sin(theta)))
    return points


def draw_shape(label: int, size: int, rng: random.Random) -> Image.Image:
    """One image of class ``label`` at ``size`` x ``size`` pixels."""
    name, base = CLASSES[label]
    big = size * SUPERSAMPLE
    shade = rng.randint(0, 60)
    image = Image.new("RGB", (big, big), (shade, shade, shade + rng.randint(0, 20)))
    draw = ImageDraw.Draw(image)
    colour = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in base)
    radius = big * rng.uniform(0.22, 0.34)
    cx = rng.uniform(radius, big - radius)
    cy = rng.uniform(radius, big - radius)
    angle = rng.uniform(0, 2 * math.pi)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    width = max(1, int(radius * 0.35))
    if name == "circle":
        draw.ellipse(box, fill=colour)
    elif name == "square":
        draw.polygon(_polygon(cx, cy, radius * 1.1, 4, angle), fill=colour)
    elif name == "triangle":
        draw.polygon(_polygon(cx, cy, radius * 1.15, 3, angle), fill=colour)
    elif name == "cross":
        for theta in (angle, angle + math.pi / 2):
            dx, dy = radius * math.cos(theta), radius * math.sin(theta)
            draw.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=colour, width=width)
    elif name == "ring":
        draw.ellipse(box, outline=colour, width=width)
    elif name == "diamond":
        draw.polygon([(cx, cy - radius * 1.2), (cx + radius * 0.7, cy), (cx, cy + radius * 1.2),
                      (cx - radius * 0.7, cy)], fill=colour)
    elif name == "bar":
        dx, dy = radius * 1.3 * math.cos(angle), radius * 1.3 * math.sin(angle)
        draw.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=colour, width=width * 2)
    elif name == "stripes":
        period = big / rng.choice((3, 4))
        for i in range(-1, 6):
            x = i * period + rng.uniform(0, 0.2) * period
            draw.rectangle((x, 0, x + period / 2, big), fill=colour)
    elif name == "dots":
        for dx, dy in ((-0.6, -0.6), (0.6, -0.6), (-0.6, 0.6), (0.6, 0.6)):
            r = radius * 0.38
            x, y = cx + dx * radius, cy + dy * radius
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    elif name == "star":
        draw.polygon(_polygon(cx, cy, radius * 1.2, 5, angle, inner=0.45), fill=colour)
    return image.resize((size, size), Image.Resampling.LANCZOS)


def write_demo_shards(out_dir: str | Path, num_images: int = 5120, image_size: int = 16,
                      samples_per_shard: int = 640, seed: int = 0,
                      progress: bool = True) -> dict[str, Any]:
    """Draw ``num_images`` images (classes in turn) into shards; returns the manifest."""
    rng = random.Random(seed)
    writer = ShardWriter(out_dir, prefix="train", samples_per_shard=samples_per_shard,
                         preprocessing={"source": "advdit demo shapes", "image_size": image_size,
                                        "seed": seed, "format": "png"})
    for index in tqdm(range(num_images), desc="drawing demo shards", disable=not progress):
        label = index % len(CLASSES)
        image = draw_shape(label, image_size, rng)
        writer.write(f"{index:08d}", label, {"png": encode_png(image)})
    return writer.close({"class_names": [name for name, _ in CLASSES]})
