import resource

import torch

from pogdiff.allocator import keep_freed_memory


def _faults_per_round(rounds: int = 3) -> float:
    """Minor page faults of this thread per round of a step-like pattern: ten 4 MiB tensors written, then all freed.

    One torch thread writes them, so the faults are this thread's (other threads of the test process are not counted).
    """
    def one_round():
        held = [torch.ones(1 << 20) for _ in range(10)]
        del held

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(2):  # the heap grows in the first rounds
            one_round()
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        for _ in range(rounds):
            one_round()
        return (resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before) / rounds
    finally:
        torch.set_num_threads(threads)


def test_memory_a_step_frees_is_reused_without_page_faults():
    assert keep_freed_memory()  # glibc: the thresholds are set
    # 40 MiB freed and written again: 10 240 pages fault in when it went back to the system
    assert _faults_per_round() < 500
