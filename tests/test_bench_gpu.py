"""``python -m bench.gpu``: it refuses cleanly where there is no GPU, and its step part runs small on the CPU
(the whole bench runs in a GPU session)."""

import pytest
import torch

from bench import gpu
from bench.sdfolder import TINY_UNET


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the refusal path does not apply")
def test_gpu_bench_refuses_on_cpu_with_one_line(capsys, tmp_path):
    out = tmp_path / "gpu.json"
    assert gpu.main(["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: bench.gpu needs a CUDA GPU") and torch.__version__ in err[0]
    assert not out.exists()


def test_step_part_interleaves_the_three_trainings_and_gives_both_ratios(tmp_path):
    """The GPU step part, run small on the CPU: every variant timed in every round, PoGDiff dense
    borrowing on most samples, sparse on fewer, vanilla on none; the ratios are of the medians."""
    out = gpu.step_overhead(tmp_path, steps=3, rounds=2, unet=TINY_UNET, image_size=16, text_hidden=32, batch=4, mixed_precision="no")
    variants = {"vanilla", "pogdiff_dense", "pogdiff_sparse"}
    assert set(out["seconds_per_step"]) == set(out["seconds_per_step_by_round"]) == set(out["borrow_share"]) == variants
    assert all(len(rounds) == 2 and min(rounds) > 0 for rounds in out["seconds_per_step_by_round"].values())
    share = out["borrow_share"]
    assert share["vanilla"] == 0.0 and share["pogdiff_dense"] > 0.5 and share["pogdiff_dense"] > share["pogdiff_sparse"]
    seconds = out["seconds_per_step"]
    assert out["dense_ratio"] == seconds["pogdiff_dense"] / seconds["vanilla"]
    assert out["sparse_ratio"] == seconds["pogdiff_sparse"] / seconds["vanilla"]
    assert out["latents"] == [4, 8, 8] and out["unet"] == TINY_UNET
    assert out["seconds_per_step_by_phase"]["pogdiff_dense"]["nb_forward"] > 0 == out["seconds_per_step_by_phase"]["vanilla"]["nb_forward"]
