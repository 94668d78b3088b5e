"""The objectives against closed forms: the Gaussian product, psi = 0, and the A/B gradient identity."""

import pytest
import torch
import torch.nn.functional as F

from pogdiff.objectives import cbdm_loss, min_snr_weight, pog_target, pogdiff_loss, vanilla_loss


def _tensors(seed=0, b=4):
    g = torch.Generator().manual_seed(seed)
    shape = (b, 3, 8, 8)
    return (torch.randn(shape, generator=g) for _ in range(3))


def test_pog_target_is_the_mean_of_the_gaussian_product():
    # N(m1, s^2) * N(m2, s^2 / psi): precisions 1/s^2 and psi/s^2 add; mean is precision weighted.
    target, nb, _ = _tensors()
    psi = torch.tensor([0.0, 0.5, 1.0, 4.0])
    s1 = torch.tensor(0.7) ** 2
    s2 = s1 / psi.clamp_min(1e-12)
    prec = 1 / s1 + 1 / s2
    expected = (target / s1 + nb / s2.view(-1, 1, 1, 1)) / prec.view(-1, 1, 1, 1)
    torch.testing.assert_close(pog_target(target, nb, psi), expected, rtol=1e-5, atol=1e-6)
    # and the PoG variance shrinks by 1 / (1 + psi)
    torch.testing.assert_close(1 / prec, s1 / (1 + psi))


def test_psi_zero_reproduces_plain_fine_tuning_exactly():
    pred, target, nb = _tensors(1)
    psi = torch.zeros(4)
    reference = F.mse_loss(pred.float(), target.float())  # the diffusers text-to-image loss
    for form in ("A", "B"):
        out = pogdiff_loss(pred, target, nb, psi, form)
        assert torch.equal(out["loss"], vanilla_loss(pred, target)["loss"])
        assert out["loss"].mean().item() == reference.item()


def test_form_b_gradient_is_one_plus_psi_times_form_a():
    pred, target, nb = _tensors(2)
    psi = torch.tensor([0.0, 0.3, 1.0, 7.0])
    grads = {}
    for form in ("A", "B"):
        p = pred.clone().requires_grad_(True)
        pogdiff_loss(p, target, nb, psi, form)["loss"].sum().backward()
        grads[form] = p.grad
    torch.testing.assert_close(grads["B"], (1 + psi).view(-1, 1, 1, 1) * grads["A"], rtol=1e-5, atol=1e-7)


def test_form_b_equals_scaled_form_a_plus_a_constant():
    # B = (1 + psi) A + psi / (1 + psi) |target - nb|^2
    pred, target, nb = _tensors(3)
    psi = torch.tensor([0.2, 1.0, 2.5, 9.0])
    a = pogdiff_loss(pred, target, nb, psi, "A")["loss"]
    b = pogdiff_loss(pred, target, nb, psi, "B")["loss"]
    const = psi / (1 + psi) * (target - nb).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(b, (1 + psi) * a + const, rtol=1e-5, atol=1e-6)


def test_neighbour_branch_carries_no_gradient():
    pred, target, nb = _tensors(4)
    nb = nb.requires_grad_(True)
    pogdiff_loss(pred.requires_grad_(True), target, nb, torch.ones(4), "B")["loss"].sum().backward()
    assert nb.grad is None


def test_large_psi_pulls_target_to_the_neighbour_prediction():
    target, nb, _ = _tensors(5)
    torch.testing.assert_close(pog_target(target, nb, torch.full((4,), 1e6)), nb, rtol=1e-4, atol=1e-4)


def test_cbdm_matches_official_formula_and_trains_both_branches():
    pred, target, nb = _tensors(6)
    pred, nb = pred.requires_grad_(True), nb.requires_grad_(True)
    w = torch.tensor([0.0, 0.25, 0.5, 1.0])
    out = cbdm_loss(pred, target, nb, w)
    mse = (pred - target).pow(2).flatten(1).mean(1)
    reg = (pred - nb).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(out["loss"], mse + w * (reg + 0.25 * reg), rtol=1e-5, atol=1e-6)
    out["loss"].sum().backward()
    assert nb.grad is not None and nb.grad[1:].abs().sum() > 0  # commitment term reaches y'
    assert nb.grad[0].abs().sum() == 0  # weight 0 (dropped caption): no CBDM term


def test_min_snr_weight():
    snr = torch.tensor([0.5, 5.0, 50.0])
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 0.1]))
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "v_prediction"), torch.tensor([0.5 / 1.5, 5 / 6, 5 / 51]))


def test_shape_mismatch_is_rejected():
    pred, target, nb = _tensors(7)
    with pytest.raises(AssertionError):
        pogdiff_loss(pred, target, nb, torch.ones(3))
