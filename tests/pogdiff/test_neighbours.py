"""Neighbour graph, effective density, neighbour sampling and psi."""

import pytest
import torch

from pogdiff.neighbours import (
    NeighbourGraph,
    effective_density,
    image_similarity,
    knn_graph,
    psi_weight,
    sample_member_images,
    sample_neighbour_captions,
)


def _unit(rows):
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def test_knn_excludes_self_and_exact_duplicates_and_sorts():
    v = _unit([[1, 0, 0], [1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0.5, 0.5, 0]])
    ids, sims = knn_graph(v, k=3, block=2)  # block < C exercises the blockwise path
    assert 0 not in ids[0].tolist() and 1 not in ids[0].tolist()  # itself and its duplicate
    assert ids[0].tolist() == [2, 4, 3]
    assert torch.all(sims[:, :-1] >= sims[:, 1:])
    exact = v @ v.T
    assert sims[0, 0].item() == pytest.approx(exact[0, 2].item())


def test_knn_pads_when_fewer_than_k_exist():
    ids, sims = knn_graph(_unit([[1, 0], [0, 1]]), k=3)
    assert ids.tolist() == [[1, -1, -1], [0, -1, -1]]
    assert torch.isinf(sims[:, 1:]).all()


def test_effective_density_is_smoothed_count():
    v = _unit([[1, 0], [0.999, 0.045], [0, 1]])
    counts = torch.tensor([100.0, 2.0, 3.0])
    rho = effective_density(v, counts, bandwidth=0.05)
    # captions 0 and 1 are almost the same text: the rare one inherits the common one's density
    assert rho[1] > 90 and rho[0] > 100
    assert rho[2] == pytest.approx(3.0, abs=1e-3)  # isolated: its own count
    assert torch.all(rho >= counts)


def _graph():
    caption_of = torch.tensor([0, 0, 0, 1, 2])
    nb_ids = torch.tensor([[1, 2], [0, -1], [-1, -1]])
    nb_sims = torch.tensor([[0.9, 0.1], [0.9, float("-inf")], [float("-inf"), float("-inf")]])
    feats = _unit([[1, 0], [1, 0], [0, 1], [1, 0.1], [-1, 0]])
    return NeighbourGraph.build(caption_of, nb_ids, nb_sims, torch.tensor([3.0, 1.0, 1.0]), feats)


def test_neighbour_sampling_follows_similarity_and_skips_missing():
    g = _graph()
    gen = torch.Generator().manual_seed(0)
    draws = sample_neighbour_captions(g, torch.zeros(4000, dtype=torch.long), 2, "similarity", gen)
    share = (draws == 1).float().mean().item()
    assert share == pytest.approx(0.9, abs=0.03)
    uni = sample_neighbour_captions(g, torch.zeros(4000, dtype=torch.long), 2, "uniform", gen)
    assert (uni == 1).float().mean().item() == pytest.approx(0.5, abs=0.03)
    assert sample_neighbour_captions(g, torch.tensor([1, 2]), 2, "similarity", gen).tolist() == [0, -1]


def test_member_images_belong_to_the_caption():
    g = _graph()
    gen = torch.Generator().manual_seed(1)
    imgs = sample_member_images(g, torch.tensor([0] * 50 + [1] * 5 + [2] * 5), gen)
    assert set(imgs[:50].tolist()) == {0, 1, 2}
    assert imgs[50:55].tolist() == [3] * 5 and imgs[55:].tolist() == [4] * 5


def test_image_similarity_is_clipped_cosine():
    g = _graph()
    s = image_similarity(g, torch.tensor([0, 0, 0]), torch.tensor([1, 2, 4]))
    assert s.tolist() == pytest.approx([1.0, 0.0, 0.0])


def test_psi_formula_and_density_ratio():
    g = _graph()
    ratio = g.density_ratio()  # mean over images of rho: (3*3 + 1 + 1) / 5 = 2.2
    assert ratio.tolist() == pytest.approx([3 / 2.2, 1 / 2.2, 1 / 2.2])
    s = torch.tensor([1.0, 0.5, 0.5])
    t = torch.tensor([0, 500, 999])
    psi = psi_weight(s, ratio, t, 1000, lam=2.0, a=2.0, b=0.5, schedule="constant", psi_max=100.0)
    expected = 2.0 * s**2 * ratio ** -0.5
    torch.testing.assert_close(psi, expected)
    # at equal image similarity a rare caption borrows sqrt(rho_common / rho_rare) times more
    same = psi_weight(torch.ones(3), ratio, t, 1000, 1.0, 1.0, 0.5, "constant", psi_max=100.0)
    assert (same[1] / same[0]).item() == pytest.approx(3**0.5)
    lin = psi_weight(s, ratio, t, 1000, lam=2.0, a=2.0, b=0.5, schedule="linear", psi_max=100.0)
    torch.testing.assert_close(lin, expected * t / 1000)
    assert psi_weight(s, ratio, t, 1000, 100.0, 0.0, 0.0, "constant", psi_max=5.0).max() == 5.0
