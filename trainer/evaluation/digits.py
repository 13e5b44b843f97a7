"""A fixed evaluator in the digits' own domain (``advdit data digits``): a small classifier trained
once on the train split with a fixed seed, stored like the FID Inception weights (a weights file
and a spec JSON carrying its SHA-256 and held-out accuracy), and the metrics it gives a set of
generated samples:

- **FID** in the classifier's feature space against the held-out split (the FID code's
  ``convnet`` feature network: its penultimate, pooled layer);
- **class consistency**: the classifier's accuracy on samples drawn for label y, i.e. how often a
  sample asked to be a 3 is read as a 3;
- **precision and recall** (Kynkaanniemi et al., NeurIPS 2019, k = 3) against the held-out
  features: precision is the share of samples inside the k-NN ball of some held-out image,
  recall the share of held-out images inside the k-NN ball of some sample.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..data import decode_sample, iter_records, resolve_shards
from .fid import ConvFeatureNet, FeatureSpec, FeatureStats, frechet_distance, load_feature_net

CLASSIFIER_FILE = "digits-classifier.pth"
SPEC_FILE = "digits-classifier.json"
K_NEIGHBOURS = 3
# A 3-layer stride-2 CNN on the 16x16 digits: 16 -> 8 -> 4 -> 2, pooled to 128 features.
ARCHITECTURE = FeatureSpec(name="digits-convnet-v1", arch="convnet", sha256="", feature_dim=128,
                           num_logits=10, input_size=16, file_name=CLASSIFIER_FILE,
                           source="advdit digits classifier (trained on data/digits/train)",
                           widths=(32, 64, 128))


def read_images(folder: str | Path, image_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of a shard folder as uint8 (N, 3, H, W), and the labels."""
    records = iter_records(resolve_shards(str(folder)))
    pairs = [decode_sample(record, image_size, 10, None) for record in records]
    images = torch.from_numpy(np.stack([pixels for pixels, _ in pairs])).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor([label for _, label in pairs])


@torch.no_grad()
def classifier_outputs(net: torch.nn.Module, images: torch.Tensor, batch_size: int = 256,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(pool features, logits) of uint8 (N, 3, H, W) images."""
    parts = [net(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    return torch.cat([p for p, _ in parts]).double(), torch.cat([logit for _, logit in parts])


def train_classifier(data_dir: str | Path, out_dir: str | Path, seed: int = 0, epochs: int = 40,
                     batch_size: int = 64, progress: bool = True) -> tuple[Path, float]:
    """Train the classifier on ``data_dir/train`` (seeded: the same file every time on one machine)
    and write its weights and spec (with SHA-256 and held-out accuracy); returns the spec path."""
    torch.manual_seed(seed)
    images, labels = read_images(Path(data_dir) / "train")
    net = ConvFeatureNet(ARCHITECTURE)
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    order = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(epochs), desc="digits classifier", disable=not progress):
        for batch in torch.randperm(len(images), generator=order).split(batch_size):
            loss = F.cross_entropy(net(images[batch])[1], labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    net.eval()
    held_images, held_labels = read_images(Path(data_dir) / "heldout")
    accuracy = class_consistency(classifier_outputs(net, held_images)[1], held_labels)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), out / CLASSIFIER_FILE)
    digest = hashlib.sha256((out / CLASSIFIER_FILE).read_bytes()).hexdigest()
    spec = dataclasses.replace(ARCHITECTURE, sha256=digest,
                               source=f"{ARCHITECTURE.source}; seed {seed}, {epochs} epochs; held-out "
                                      f"accuracy {accuracy:.4f}")
    return spec.to_file(out / SPEC_FILE), accuracy


def class_consistency(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The share of images the classifier reads as the label they were made (or drawn) for."""
    return float((logits.argmax(dim=1).cpu() == labels.cpu()).double().mean())


def knn_radii(features: torch.Tensor, k: int) -> torch.Tensor:
    """Each point's distance to its k-th nearest other point of the same set."""
    distances = torch.cdist(features, features)
    return distances.kthvalue(k + 1, dim=1).values  # the 1st is the point itself, at 0


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = K_NEIGHBOURS) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of ``fake`` against ``real``."""
    real_radii, fake_radii = knn_radii(real, k), knn_radii(fake, k)
    between = torch.cdist(fake, real)  # (fake, real)
    precision = (between <= real_radii[None, :]).any(dim=1).double().mean()
    recall = (between <= fake_radii[:, None]).any(dim=0).double().mean()
    return float(precision), float(recall)


@dataclass
class DigitsScores:
    fid: float
    class_consistency: float
    precision: float
    recall: float
    num_samples: int

    def as_dict(self, prefix: str = "digits/") -> dict[str, float]:
        return {f"{prefix}{key}": float(value) for key, value in dataclasses.asdict(self).items()}


def frechet(features: torch.Tensor, reference: torch.Tensor) -> float:
    stats = [FeatureStats(features.shape[1]), FeatureStats(features.shape[1])]
    for holder, values in zip(stats, (features, reference), strict=True):
        holder.add(values)
    (mu1, sigma1), (mu2, sigma2) = (holder.mean_cov() for holder in stats)
    return frechet_distance(mu1, sigma1, mu2, sigma2)


def score_digits(images: torch.Tensor, labels: torch.Tensor, data_dir: str | Path,
                 spec_path: str | Path) -> DigitsScores:
    """The four metrics of uint8 (N, 3, 16, 16) samples drawn for ``labels``, against the held-out
    split, with the classifier of ``spec_path`` (its weights file beside it, checked by SHA-256)."""
    spec = FeatureSpec.from_file(spec_path)
    net = load_feature_net(Path(spec_path).with_name(spec.file_name), spec)
    features, logits = classifier_outputs(net, images)
    reference, _ = classifier_outputs(net, read_images(Path(data_dir) / "heldout", spec.input_size)[0])
    precision, recall = precision_recall(reference, features)
    return DigitsScores(frechet(features, reference), class_consistency(logits, labels), precision, recall,
                        len(images))
