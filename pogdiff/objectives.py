"""Training objectives as pure tensor functions returning named per-sample terms.

Notation (DESIGN §4): ``pred = f(z_t, y, t)``, ``target`` = eps (or v), ``nb = sg[f(z_t, y', t)]`` the
model's own prediction for a neighbouring caption at the same z_t, t, eps; ``psi >= 0`` per sample.

* vanilla:  L = |pred - target|^2
* pogdiff, form B (default):  L = |pred - target|^2 + psi |pred - nb|^2
* pogdiff, form A:  L = |pred - target*|^2,  target* = (target + psi nb) / (1 + psi)
  (the mean of the product of N(target, s^2) and N(nb, s^2 / psi)). grad B = (1 + psi) grad A.
* cbdm (Qin et al. 2023, official code):  L = |pred - target|^2
  + w [ |pred - sg(nb)|^2 + 1/4 |sg(pred) - nb|^2 ],  w = tau t / T, y' uniform over captions.

``|.|^2`` is the mean over all non-batch dimensions, as ``F.mse_loss`` in the diffusers example.
Every function returns ``{"loss": [B], ...}``; callers weight and reduce.
"""

from __future__ import annotations

from typing import Literal

import torch


def per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample: ``[B, ...] x [B, ...] -> [B]`` (computed in float32)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


def vanilla_loss(pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Plain fine-tuning: ``loss = mse = |pred - target|^2``, each ``[B]``."""
    mse = per_sample_mse(pred, target)
    return {"loss": mse, "mse": mse}


def pog_target(target: torch.Tensor, nb: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
    """Mean of the product of Gaussians: ``(target + psi nb) / (1 + psi)``; psi ``[B]``, tensors ``[B, ...]``."""
    w = psi.view(-1, *([1] * (target.dim() - 1))).to(target.dtype)
    return (target + w * nb) / (1 + w)


def pogdiff_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    nb: torch.Tensor,
    psi: torch.Tensor,
    form: Literal["A", "B"] = "B",
) -> dict[str, torch.Tensor]:
    """PoGDiff objective. pred, target, nb ``[B, C, H, W]``; psi ``[B]``; nb carries no gradient.

    Returns ``loss``, ``mse`` (= |pred - target|^2) and ``pog`` (= |pred - nb|^2), each ``[B]``.
    With psi = 0 the loss equals ``mse`` exactly (plain fine-tuning), whatever nb holds.
    """
    assert psi.shape == pred.shape[:1], (psi.shape, pred.shape)
    nb = nb.detach()
    mse = per_sample_mse(pred, target)
    pog = per_sample_mse(pred, nb)
    if form == "B":
        loss = mse + psi.float() * pog
    elif form == "A":
        loss = per_sample_mse(pred, pog_target(target, nb, psi))
        # psi = 0 rows must be bit-identical to plain fine-tuning.
        loss = torch.where(psi > 0, loss, mse)
    else:
        raise ValueError(f"unknown PoG loss form {form!r}; expected 'A' or 'B'")
    return {"loss": loss, "mse": mse, "pog": pog}


def cbdm_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    nb: torch.Tensor,
    weight: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """CBDM objective; ``nb`` must keep its gradient (the commitment term trains the y' branch).

    weight ``[B]`` is tau * t / T, zero where the caption was dropped for guidance.
    """
    assert weight.shape == pred.shape[:1], (weight.shape, pred.shape)
    mse = per_sample_mse(pred, target)
    reg = per_sample_mse(pred, nb.detach())
    com = per_sample_mse(pred.detach(), nb)
    w = weight.float()
    return {"loss": mse + w * (reg + 0.25 * com), "mse": mse, "reg": reg, "commit": com}


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023), as in the diffusers text-to-image example.

    epsilon: min(snr, gamma) / snr;  v_prediction: min(snr, gamma) / (snr + 1).
    """
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr
