"""No orphaned trainers and never two writers in one run folder: a real SIGKILL of the process
that launched a 2-process DDP job takes the launcher and both ranks with it, and a second
trainer into a folder that is being written fails at once, naming the writer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
from faultkit import ROOT, base_env, record
from localserver import wait_for

from pogdiff.config import PoGConfig, TrainConfig
from pogdiff.demo import train_set
from pogdiff.pipelines.pixel import PixelDiffusionPipeline
from pogdiff.process import RunFolderBusy, WriterLock
from pogdiff.trainer import train


def _trainers(run: str) -> list[psutil.Process]:
    """Live processes whose command line names the run folder (the launcher and its ranks)."""
    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and any(run in part for part in p.info["cmdline"] or []):
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


@pytest.mark.slow
def test_sigkill_of_the_flow_process_kills_the_ddp_launcher_and_its_ranks(tiny_spec, tmp_path):
    base, run = tmp_path / "base", tmp_path / "run"
    PixelDiffusionPipeline.new(tiny_spec, seed=0).save_pretrained(base)
    parent = textwrap.dedent(f"""
        from pogdiff.config import PoGConfig, TrainConfig
        from pogdiff.demo import train_set
        from tasks.train import launch_ddp
        data = train_set.train_data([6, 3, 2, 1], size={tiny_spec.image_size}, k=2)
        cfg = TrainConfig(base_model={str(base)!r}, steps=100000, batch_size=4, checkpoint_every=1000,
                          num_processes=2, pog=PoGConfig(method="vanilla"))
        launch_ddp(data, cfg, __import__("pathlib").Path({str(run)!r}), lambda step, m: None)
    """)
    proc = subprocess.Popen([sys.executable, "-c", parent], cwd=ROOT, env=base_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = run / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and metrics.stat().st_size > 0 or proc.poll() is not None, 300, "the first DDP step")
    assert proc.poll() is None, "the launching process ended before the kill"
    children = [p for p in _trainers(str(run)) if p.pid != proc.pid]
    launchers = [p for p in children if "pogdiff.launch" in p.info["cmdline"]]
    ranks = [p for p in children if "tasks.train_cli" in p.info["cmdline"] and p not in launchers]
    assert (len(launchers), len(ranks)) == (1, 2), [p.info["cmdline"][:4] for p in children]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    wait_for(lambda: not _trainers(str(run)), 30, "the launcher and the ranks to die with their parent", interval=0.5)
    lines = metrics.read_text().count("\n")
    time.sleep(2)
    assert metrics.read_text().count("\n") == lines  # nobody writes into the run folder any more
    record("SIGKILL of the process that launched DDP training (2 ranks)", "train",
           "the accelerate launcher and both ranks die with it (PR_SET_PDEATHSIG); nothing writes into the run folder afterwards")


def test_a_second_writer_into_a_busy_run_folder_fails_naming_the_first(tiny_spec, tmp_path):
    data = train_set.train_data([6, 3, 2, 1], size=tiny_spec.image_size, k=2)
    cfg = TrainConfig(steps=2, batch_size=4, checkpoint_every=1, pog=PoGConfig(method="vanilla"))
    # a real second process holds the folder, as an orphaned trainer would
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pogdiff.process import WriterLock\n"
                               "with WriterLock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)\n", str(tmp_path / "run")],
        cwd=ROOT, env=base_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderBusy, match=f"being written by another process \\(pid {holder.pid}\\)"):
            train(PixelDiffusionPipeline.new(tiny_spec, seed=0), data, cfg, tmp_path / "run")
        assert not (tmp_path / "run" / "checkpoints").exists()  # refused before writing anything
    finally:
        holder.kill()
        holder.wait()
    # the kernel released the dead holder's lock: training goes ahead
    result = train(PixelDiffusionPipeline.new(tiny_spec, seed=0), data, cfg, tmp_path / "run")
    assert result.steps == 2
    with WriterLock(tmp_path / "run"):  # and released it when it finished
        pass
    record("a second trainer into a run folder that a live process is writing", "train",
           "`RunFolderBusy: run folder ... is being written by another process (pid N)` before anything is written; "
           "a dead holder's lock is released by the kernel")
