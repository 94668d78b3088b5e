"""The method registry and the methods' draws: one class per method, draws from the neighbour stream only."""

import typing

import pytest
import torch

from pogdiff.config import PoGConfig
from pogdiff.demo import train_set
from pogdiff.methods import CBDM, METHODS, Batch, PoGDiff, Vanilla, make_method


@pytest.fixture(scope="module")
def graph():
    return train_set.train_data([6, 3, 2, 1], size=16, k=2).graph


def _batch(graph, B=16, seed=0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(graph.caption_of.shape[0], (B,), generator=g)
    return Batch(idx, graph.caption_of[idx], torch.rand(B, generator=g) < 0.25, torch.randint(1000, (B,), generator=g))


def test_registry_holds_exactly_the_configurable_methods():
    assert set(METHODS) == set(typing.get_args(PoGConfig.model_fields["method"].annotation))
    assert (METHODS["vanilla"], METHODS["pogdiff"], METHODS["cbdm"]) == (Vanilla, PoGDiff, CBDM)


def test_make_method_builds_the_named_class_and_names_an_unknown_one(graph):
    assert isinstance(make_method(PoGConfig(method="cbdm"), graph, 1000), CBDM)
    with pytest.raises(ValueError, match="unknown method 'magic'"):
        make_method(PoGConfig.model_construct(method="magic"), graph, 1000)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_draws_cover_the_global_batch_from_the_neighbour_stream(name, graph):
    method = make_method(PoGConfig(method=name, lam=1.0), graph, 1000)
    batch = _batch(graph)
    gen = torch.Generator().manual_seed(1)
    draws = method.draw(batch, gen)
    assert all(v.shape == (16,) for v in draws.values())
    again = method.draw(batch, torch.Generator().manual_seed(1))
    assert all(torch.equal(draws[k], again[k]) for k in draws)  # the generator is the only randomness
    if name == "vanilla":
        assert draws == {} and torch.equal(gen.get_state(), torch.Generator().manual_seed(1).get_state())


def test_cbdm_draws_another_caption_weighted_by_t_and_zero_where_dropped(graph):
    method = make_method(PoGConfig(method="cbdm", cbdm_tau=2.0), graph, 1000)
    batch = _batch(graph)
    draws = method.draw(batch, torch.Generator().manual_seed(0))
    assert (draws["other_caption"] != batch.caption).all()
    assert ((draws["other_caption"] >= 0) & (draws["other_caption"] < graph.num_captions)).all()
    torch.testing.assert_close(draws["weight"], 2.0 * batch.t.float() / 1000 * (~batch.dropped).float())


def test_pogdiff_borrows_nothing_for_dropped_captions(graph):
    method = make_method(PoGConfig(method="pogdiff", lam=1.0, similarity_quantile=0.0), graph, 1000)
    batch = _batch(graph)
    draws = method.draw(batch, torch.Generator().manual_seed(0))
    assert (draws["psi"][batch.dropped] == 0).all() and torch.equal(draws["active"], draws["psi"] > 0)
    assert method.metrics({"psi": draws["psi"], "active": draws["active"].float()}, batch.t)["psi/tau"] == method.tau


def test_the_controls_keep_psi_and_swap_whose_prediction_is_borrowed(graph):
    batch = _batch(graph, B=64)
    base = dict(method="pogdiff", lam=1.0, similarity_quantile=0.0)
    graph_draw = make_method(PoGConfig(**base), graph, 1000).draw(batch, torch.Generator().manual_seed(0))
    active = graph_draw["active"]
    assert active.sum() > 10  # enough borrowing rows for the checks to mean something
    for neighbour in ("random", "self"):
        draws = make_method(PoGConfig(**base, neighbour=neighbour), graph, 1000).draw(batch, torch.Generator().manual_seed(0))
        assert torch.equal(draws["psi"], graph_draw["psi"]) and torch.equal(draws["active"], active)
        assert (draws["nb_caption"][~active] == -1).all()
        if neighbour == "self":
            assert torch.equal(draws["nb_caption"][active], batch.caption[active])
        else:
            picked = draws["nb_caption"][active]
            assert (picked != batch.caption[active]).all() and (picked >= 0).all() and (picked < graph.num_captions).all()
            # uniform over the others, not the graph's top-k: some rows land outside their caption's neighbours
            outside = [int(p) not in graph.nb_ids[int(c)].tolist() for p, c in zip(picked, batch.caption[active])]
            assert any(outside)
