"""Neighbour graph, effective density, neighbour sampling and psi."""

import pytest
import torch

from pogdiff.config import PoGConfig
from pogdiff.neighbours import (
    NeighbourGraph,
    draw_borrowing,
    effective_density,
    exact_graph,
    graph_from_candidates,
    image_similarity,
    knn_graph,
    psi_weight,
    sample_member_images,
    similarity_threshold,
    thresholded,
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


def _clustered(n, d=32, clusters=40, spread=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, d, generator=g)
    pick = torch.randint(0, clusters, (n,), generator=g)
    return torch.nn.functional.normalize(centres[pick] + spread * torch.randn(n, d, generator=g), dim=1)


def _brute_force(v, counts, k, h):
    """Full C x C similarity matrix: top-k without itself and duplicates, and the untruncated kernel sum."""
    s = v @ v.T
    rho = torch.exp(-(1 - s.clamp(-1, 1)).pow(2) / (2 * h * h)) @ counts
    s.fill_diagonal_(float("-inf"))
    s[s >= 1 - 1e-5] = float("-inf")
    top_s, top_i = s.topk(k, dim=1)
    return top_i, top_s, rho


def test_exact_graph_equals_brute_force_on_thousands_of_vectors():
    v = _clustered(3000)
    v[7] = v[5]  # an exact duplicate pair: never each other's neighbour, but each in the other's density
    counts = torch.randint(1, 50, (3000,), generator=torch.Generator().manual_seed(1)).float()
    ids, sims, rho = exact_graph(v, counts, k=10, bandwidth=0.1, block=700)  # uneven last block
    ref_i, ref_s, ref_rho = _brute_force(v, counts, 10, 0.1)
    assert torch.equal(ids, ref_i)
    torch.testing.assert_close(sims, ref_s)
    torch.testing.assert_close(rho, ref_rho, rtol=1e-5, atol=1e-4)
    assert 7 not in ids[5].tolist() and 5 not in ids[7].tolist()
    assert rho[5] >= counts[5] + counts[7] - 1e-4
    # the thin wrappers agree with the one-pass version
    assert torch.equal(knn_graph(v, 10, block=512)[0], ids)
    torch.testing.assert_close(effective_density(v, counts, 0.1, block=512), rho)


def test_rare_caption_in_a_dense_cluster_has_higher_density_than_an_isolated_one():
    d = 16
    centre = torch.nn.functional.normalize(torch.ones(d), dim=0)
    g = torch.Generator().manual_seed(0)
    cluster = torch.nn.functional.normalize(centre + 0.05 * torch.randn(30, d, generator=g), dim=1)  # well covered
    rare_in_cluster = torch.nn.functional.normalize(centre + 0.05 * torch.randn(1, d, generator=g), dim=1)
    isolated = torch.nn.functional.normalize(-centre + 0.3 * torch.randn(1, d, generator=g), dim=1)
    v = torch.cat([cluster, rare_in_cluster, isolated])
    counts = torch.cat([torch.full((30,), 20.0), torch.tensor([1.0, 1.0])])
    _, _, rho = exact_graph(v, counts, k=5, bandwidth=0.05)
    # both rare captions have one image; only the one among well-covered neighbours borrows their count
    assert rho[30] > 10 * rho[31]
    assert rho[31] == pytest.approx(1.0, abs=1e-3)


def test_graph_from_full_candidate_lists_equals_exact():
    v = _clustered(500)
    counts = torch.randint(1, 9, (500,), generator=torch.Generator().manual_seed(2)).float()
    ids, sims, rho = exact_graph(v, counts, k=5, bandwidth=0.1)
    everyone = torch.arange(500).repeat(500, 1)  # includes the row itself: it must be dropped
    c_ids, c_sims, c_rho = graph_from_candidates(v, counts, everyone, k=5, bandwidth=0.1, block=128)
    assert torch.equal(c_ids, ids)
    torch.testing.assert_close(c_sims, sims)
    torch.testing.assert_close(c_rho, rho, rtol=1e-5, atol=1e-4)


def test_graph_from_candidates_ignores_padding_repeats_and_itself():
    v = _unit([[1, 0], [0.99, 0.14], [0.9, 0.44], [0, 1]])
    counts = torch.tensor([1.0, 2.0, 3.0, 4.0])
    cand = torch.tensor([[0, 1, 1, -1], [0, -1, -1, -1], [-1, -1, -1, -1], [2, 2, 3, 1]])
    ids, sims, rho = graph_from_candidates(v, counts, cand, k=2, bandwidth=0.05)
    assert ids.tolist() == [[1, -1], [0, -1], [-1, -1], [2, 1]]
    assert torch.isinf(sims[0, 1]) and torch.isinf(sims[2]).all()
    exact = effective_density(v, counts, 0.05)
    # row 0 saw caption 1 once (the repeat is not counted twice); row 2 saw nobody: its own count
    k01 = torch.exp(-(1 - (v[0] @ v[1])) ** 2 / (2 * 0.05**2))
    assert rho[0].item() == pytest.approx((1 + 2 * k01).item(), rel=1e-5)
    assert rho[2].item() == pytest.approx(3.0)
    assert rho[0] <= exact[0] + 1e-5


def _graph():
    caption_of = torch.tensor([0, 0, 0, 1, 2])
    nb_ids = torch.tensor([[1, 2], [0, -1], [-1, -1]])
    nb_sims = torch.tensor([[0.9, 0.1], [0.9, float("-inf")], [float("-inf"), float("-inf")]])
    feats = _unit([[1, 0], [1, 0], [0, 1], [1, 0.1], [-1, 0]])
    return NeighbourGraph.build(caption_of, nb_ids, nb_sims, torch.tensor([3.0, 1.0, 1.0]), feats)


def _draw(g, images, pog, tau=0.0, t=None, dropped=None, seed=0):
    images = torch.as_tensor(images)
    t = torch.full_like(images, 500) if t is None else t
    dropped = torch.zeros(len(images), dtype=torch.bool) if dropped is None else dropped
    return draw_borrowing(g, images, t, dropped, pog, tau, 1000, torch.Generator().manual_seed(seed))


def test_neighbour_draw_ranks_caption_and_image_similarity_together():
    # caption 0 (images 0-2) has neighbours 1 (cos 0.6) and 2 (cos 0.3); every image looks alike
    caption_of = torch.tensor([0, 0, 0, 1, 2])
    g = NeighbourGraph.build(caption_of, torch.tensor([[1, 2], [0, 2], [0, 1]]), torch.tensor([[0.6, 0.3], [0.6, 0.1], [0.3, 0.1]]),
                             torch.ones(3), _unit([[1, 0]] * 5))
    pog = PoGConfig(lam=0.1, b=0.0)
    draws = _draw(g, torch.zeros(6000, dtype=torch.long), pog)
    assert (draws.nb_caption == 1).float().mean().item() == pytest.approx(0.6 / 0.9, abs=0.03)
    uniform = _draw(g, torch.zeros(6000, dtype=torch.long), pog.model_copy(update={"neighbour_sampling": "uniform"}))
    assert (uniform.nb_caption == 1).float().mean().item() == pytest.approx(0.5, abs=0.03)
    # the same caption similarities, but caption 1's image now looks unlike image 0: always caption 2
    apart = NeighbourGraph.build(caption_of, g.nb_ids, g.nb_sims, torch.ones(3), _unit([[1, 0], [1, 0], [1, 0], [0, 1], [1, 0]]))
    assert set(_draw(apart, torch.zeros(500, dtype=torch.long), pog).nb_caption.tolist()) == {2}


def test_no_borrowing_below_the_similarity_threshold_without_a_neighbour_or_when_dropped():
    g = _graph()  # image 0 ~ caption 1's image (cos 0.995), image 2 ~ it at cos 0.0995, caption 2's image opposite
    pog = PoGConfig(lam=1.0, a=1.0, b=0.0, psi_threshold=0.0)
    open_draw = _draw(g, [0, 2, 4], pog, tau=0.0)
    assert open_draw.nb_caption.tolist() == [1, 1, -1]  # caption 2's only neighbour is missing
    assert open_draw.psi[1].item() == pytest.approx(0.0995, abs=1e-3)
    shut = _draw(g, [0, 2], pog, tau=0.5)
    assert shut.nb_caption.tolist() == [1, -1] and shut.psi[1].item() == 0.0  # 0.0995 < tau: psi is 0
    assert shut.psi[0].item() == pytest.approx((0.995 - 0.5) / 0.5, abs=1e-3)  # rescaled above tau
    assert shut.s_img[0].item() == pytest.approx(0.995, abs=1e-3)  # the raw cosine is reported
    dropped = _draw(g, [0, 0], pog, dropped=torch.tensor([True, False]))
    assert dropped.psi[0].item() == 0.0 and dropped.nb_caption[0].item() == -1 and dropped.psi[1].item() > 0


def test_similarity_threshold_is_a_quantile_of_random_pairs_of_other_captions():
    # two captions; images of the same caption are identical (never paired), across captions cos = 0.6
    feats = _unit([[1, 0, 0], [1, 0, 0], [0.6, 0.8, 0], [0.6, 0.8, 0]])
    caption_of = torch.tensor([0, 0, 1, 1])
    assert similarity_threshold(feats, caption_of, 0.5) == pytest.approx(0.6)
    assert similarity_threshold(feats, caption_of, 0.0) == 0.0
    assert similarity_threshold(feats, torch.zeros(4, dtype=torch.long), 0.9) == 0.0  # one caption: no pairs
    assert similarity_threshold(feats, caption_of, 0.5, seed=3) == similarity_threshold(feats, caption_of, 0.5, seed=3)
    assert thresholded(torch.tensor([0.2, 0.6, 0.8, 1.0]), 0.6).tolist() == pytest.approx([0.0, 0.0, 0.5, 1.0])


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
    ratio = g.density_ratio  # mean over images of rho: (3*3 + 1 + 1) / 5 = 2.2
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
    inverse = psi_weight(s, ratio, t, 1000, lam=2.0, a=2.0, b=0.5, schedule="inverse", psi_max=100.0)
    torch.testing.assert_close(inverse, expected * (1 - t / 1000))
    assert psi_weight(s, ratio, t, 1000, 100.0, 0.0, 0.0, "constant", psi_max=5.0).max() == 5.0
    # with a = 0 a pair without any similarity still borrows nothing (0^0 is not 1 here)
    assert psi_weight(torch.tensor([0.0, 0.5]), ratio[:2], t[:2], 1000, 1.0, 0.0, 0.0, "constant", 10.0).tolist() == [0.0, 1.0]
