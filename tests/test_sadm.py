"""SADM structure math on hand-made feature sets, and a real 2-process run (gloo) for the gathers.

The 2-process run also checks Diffusion-GAN's all-reduced controller statistic: one spawn (a few
seconds of start-up) covers both collectives.
"""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from advdit.trainer.objectives.diffusion_gan import AdaptiveDiffusion
from advdit.trainer.objectives.sadm import (
    affinity,
    gather_rows_with_local_grad,
    structural_distance,
    timestep_weight,
)

from helpers import free_port

WORLD_SIZE = 2
LOCAL_BATCH = 4
# (affinity kind, distance kind) pairs exercised across processes.
COMBINATIONS = (("cosine", "l1"), ("gaussian", "l2"), ("softmax", "kl"))


# --------------------------------------------------------------------------- affinities


def test_cosine_affinity_of_hand_made_features() -> None:
    features = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])  # cosine ignores the norms
    r = 1 / math.sqrt(2)
    expected = torch.tensor([[0.0, 0.0, r], [0.0, 0.0, r], [r, r, 0.0]])
    assert torch.allclose(affinity(features, "cosine"), expected, atol=1e-6)


def test_gaussian_and_softmax_affinities_of_hand_made_features() -> None:
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    gaussian = affinity(features, "gaussian", tau=0.5)
    # squared distances: |e1 - e2|^2 = 2, |e1 + e1|^2 = 4
    assert torch.allclose(gaussian, torch.tensor([[0.0, math.exp(-4), math.exp(-8)],
                                                  [math.exp(-4), 0.0, math.exp(-4)],
                                                  [math.exp(-8), math.exp(-4), 0.0]]), atol=1e-7)
    softmax = affinity(features, "softmax", tau=0.5)
    # row 0 over j = 1, 2: logits <e1, e2> / 0.5 = 0 and <e1, -e1> / 0.5 = -2
    assert torch.allclose(softmax[0], torch.tensor([0.0, 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(2))]))
    assert torch.allclose(softmax.sum(dim=1), torch.ones(3))
    assert torch.equal(softmax.diagonal(), torch.zeros(3))


def test_structural_distances_on_hand_made_matrices_ignore_the_diagonal() -> None:
    real = torch.tensor([[9.0, 0.2, 0.8], [0.5, -9.0, 0.5], [0.1, 0.9, 5.0]])
    fake = torch.tensor([[0.0, 0.4, 0.6], [0.5, 0.0, 0.5], [0.3, 0.7, 0.0]])
    differences = [0.2, 0.2, 0.0, 0.0, 0.2, 0.2]  # off-diagonal |real - fake|
    assert structural_distance(real, fake, "l1").item() == pytest.approx(sum(differences) / 6)
    assert structural_distance(real, fake, "l2").item() == pytest.approx(sum(d * d for d in differences) / 6)
    rows = [((0.2, 0.8), (0.4, 0.6)), ((0.5, 0.5), (0.5, 0.5)), ((0.1, 0.9), (0.3, 0.7))]
    expected_kl = sum(sum(p * math.log(p / q) for p, q in zip(ps, qs, strict=True)) for ps, qs in rows) / 3
    assert structural_distance(real, fake, "kl").item() == pytest.approx(expected_kl, rel=1e-5)


def _clustered(assignment: list[int]) -> torch.Tensor:
    """Unit features: sample i near axis assignment[i], with a little per-sample jitter."""
    jitter = 0.1 * torch.randn(len(assignment), 3, generator=torch.Generator().manual_seed(0))
    return torch.nn.functional.normalize(torch.eye(3)[assignment] + jitter, dim=1)


@pytest.mark.parametrize(("kind", "distance"), COMBINATIONS)
def test_identical_structures_give_zero_and_permuted_ones_a_positive_distance(kind: str,
                                                                              distance: str) -> None:
    real = _clustered([0, 0, 1, 1, 2, 2])
    rotation, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(1)))
    # A rotated copy has the same structure (same pairwise relations): distance 0.
    same = structural_distance(affinity(real, kind), affinity(real @ rotation, kind), distance)
    assert same.item() == pytest.approx(0.0, abs=1e-5)
    # Same clusters, different pairs: sample 1 is grouped with 2 instead of 0.
    permuted = real[[0, 2, 1, 3, 4, 5]]
    assert structural_distance(affinity(real, kind), affinity(permuted, kind), distance).item() > 0.05


@pytest.mark.parametrize(("kind", "distance"), COMBINATIONS)
def test_gradients_are_finite_even_for_duplicate_rows(kind: str, distance: str) -> None:
    # Duplicates make squared distances exactly 0; the softmax diagonal is exactly 0 (log -> -inf).
    real = _clustered([0, 0, 1, 2])[[0, 0, 2, 3]].requires_grad_()
    fake = _clustered([1, 0, 2, 2]).requires_grad_()
    structural_distance(affinity(real, kind), affinity(fake, kind), distance).backward()
    assert torch.isfinite(real.grad).all() and torch.isfinite(fake.grad).all()
    assert fake.grad.abs().sum() > 0


def test_bad_affinity_and_distance_arguments() -> None:
    with pytest.raises(ValueError, match="kind must be one of"):
        affinity(torch.randn(3, 2), "dot")
    with pytest.raises(ValueError, match="expected \\(B, d\\) with B >= 2"):
        affinity(torch.randn(1, 2))
    with pytest.raises(ValueError, match="tau must be > 0"):
        affinity(torch.randn(3, 2), "gaussian", tau=0.0)
    with pytest.raises(ValueError, match="must both be \\(B, B\\)"):
        structural_distance(torch.zeros(3, 3), torch.zeros(4, 4))


# --------------------------------------------------------------------------- timestep weights


def test_timestep_weights() -> None:
    alphas_cumprod = np.linspace(0.99, 0.01, 1000)
    t = torch.tensor([0, 250, 999])
    assert torch.equal(timestep_weight(t, alphas_cumprod), torch.ones(3))
    snr = timestep_weight(t, alphas_cumprod, "snr")
    assert torch.allclose(snr, torch.tensor(alphas_cumprod[[0, 250, 999]], dtype=torch.float32))
    ratio = alphas_cumprod / (1 - alphas_cumprod)  # SNR / (1 + SNR) == alphas_cumprod
    assert torch.allclose(snr, torch.tensor(ratio / (1 + ratio))[t].float())
    assert torch.equal(timestep_weight(t, alphas_cumprod, "range", t_max=250), torch.tensor([1.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="t_max must be given"):
        timestep_weight(t, alphas_cumprod, "range")
    with pytest.raises(ValueError, match="mode must be one of"):
        timestep_weight(t, alphas_cumprod, "exp")


# --------------------------------------------------------------------------- gathering


def test_gather_is_the_identity_without_a_process_group() -> None:
    features = torch.randn(3, 2, requires_grad=True)
    assert gather_rows_with_local_grad(features) is features


def _global_features() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    batch = WORLD_SIZE * LOCAL_BATCH
    real = torch.nn.functional.normalize(torch.randn(batch, 6, generator=generator), dim=1)
    fake = torch.nn.functional.normalize(torch.randn(batch, 6, generator=generator), dim=1)
    return real, fake


def _structure_loss(real: torch.Tensor, fake: torch.Tensor, local_rows: slice | None,
                    kind: str, distance: str) -> dict[str, torch.Tensor]:
    """Distance of the global batch; with ``local_rows``, each rank feeds only its rows to the gather.

    The rows are slices of full-batch leaves, so the leaves' gradients show which rows were reached.
    """
    real_leaf, fake_leaf = real.clone().requires_grad_(), fake.clone().requires_grad_()
    real_rows, fake_rows = real_leaf, fake_leaf
    if local_rows is not None:
        real_rows = gather_rows_with_local_grad(real_leaf[local_rows])
        fake_rows = gather_rows_with_local_grad(fake_leaf[local_rows])
    real_aff, fake_aff = affinity(real_rows, kind), affinity(fake_rows, kind)
    loss = structural_distance(real_aff, fake_aff, distance)
    loss.backward()
    return {"real_aff": real_aff.detach(), "fake_aff": fake_aff.detach(), "loss": loss.detach(),
            "real_grad": real_leaf.grad, "fake_grad": fake_leaf.grad}


def _controller_on_rank(rank: int) -> list[tuple[float, float, int]]:
    """Rank 0 sees a D that is always right (mean sign 1), rank 1 one at chance (mean sign 0)."""
    ada = AdaptiveDiffusion(ada_interval=1, seed=rank)
    logits = torch.ones(16) if rank == 0 else torch.tensor([1.0, -1.0, 1.0, -1.0])
    history = []
    for step in range(3):
        ada.accumulate(logits)
        stats = ada.update(10_000, torch.Generator().manual_seed(100 * rank + step))
        history.append((stats.r_d, stats.p, stats.T))
    return history


def _worker(rank: int, port: int, out_dir: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD_SIZE, timeout=timedelta(seconds=60))
    try:
        real, fake = _global_features()
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        results = {
            "structure": {combo: _structure_loss(real, fake, rows, *combo) for combo in COMBINATIONS},
            "controller": _controller_on_rank(rank),
        }
        torch.save(results, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(free_port(), out_dir), nprocs=WORLD_SIZE, join=True)
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]


@pytest.mark.parametrize("combo", COMBINATIONS)
def test_two_process_gather_equals_one_process_on_the_whole_batch(
        two_process_results: list[dict], combo: tuple[str, str]) -> None:
    single = _structure_loss(*_global_features(), None, *combo)
    total_real_grad = torch.zeros_like(single["real_grad"])
    for rank, results in enumerate(two_process_results):
        ranked = results["structure"][combo]
        for key in ("real_aff", "fake_aff", "loss"):
            assert torch.allclose(ranked[key], single[key], atol=1e-6), (rank, key)
        local = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        for side in ("real_grad", "fake_grad"):
            grad = ranked[side]
            # Own rows: the global loss's gradient; other ranks' rows: nothing reached them.
            assert torch.allclose(grad[local], single[side][local], atol=1e-6), (rank, side)
            outside = torch.ones(grad.shape[0], dtype=torch.bool)
            outside[local] = False
            assert torch.count_nonzero(grad[outside]) == 0, (rank, side)
        total_real_grad += ranked["real_grad"]
    assert single["real_grad"].abs().max() > 0
    assert torch.allclose(total_real_grad, single["real_grad"], atol=1e-6)


def test_two_process_controller_all_reduces_the_sign_statistic(two_process_results: list[dict]) -> None:
    rank0, rank1 = (results["controller"] for results in two_process_results)
    assert rank0 == rank1  # identical r_d, p and T on both ranks
    # Global mean sign (16 + 0) / 20 = 0.8 > 0.6: p rises by 10_000 * 1 / 100_000 = 0.1 per update,
    # although rank 1's own statistic (0 < 0.6) would have kept p at 0.
    for step, (r_d, p, T) in enumerate(rank0, start=1):
        assert r_d == pytest.approx(0.8)
        assert p == pytest.approx(0.1 * step)
        assert T == 10 + round(0.1 * step * 990)


def test_weights_make_a_weighted_mean_of_the_pairs() -> None:
    generator = torch.Generator().manual_seed(5)
    real = affinity(torch.randn(4, 3, generator=generator))
    fake = affinity(torch.randn(4, 3, generator=generator))
    weights = torch.tensor([1.0, 1.0, 0.0, 0.0])
    # Only the pair (0, 1) and (1, 0) keep weight: the distance is their mean |difference|.
    expected = (real[0, 1] - fake[0, 1]).abs()
    assert torch.allclose(structural_distance(real, fake, "l1", weights), expected)
    assert torch.allclose(structural_distance(real, fake, "l1", torch.ones(4)),
                          structural_distance(real, fake, "l1"))
    assert structural_distance(real, fake, "l2", torch.zeros(4)) == 0
