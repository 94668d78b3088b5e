"""``python -m bench.gpu`` refuses cleanly where there is no GPU (its parts run in a GPU session)."""

import pytest
import torch

from bench import gpu


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the refusal path does not apply")
def test_gpu_bench_refuses_on_cpu_with_one_line(capsys, tmp_path):
    out = tmp_path / "gpu.json"
    assert gpu.main(["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: bench.gpu needs a CUDA GPU") and torch.__version__ in err[0]
    assert not out.exists()
