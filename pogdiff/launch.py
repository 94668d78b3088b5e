"""``python -m pogdiff.launch <accelerate launch arguments>``: ``accelerate launch`` that dies with its parent.

The train task starts DDP through this module instead of ``accelerate.commands.launch`` directly:
the launcher first asks the kernel to kill it when the flow process dies (``die_with_parent``),
then names itself as the parent its ranks must not outlive; each rank (``tasks.train_cli``) makes
the same request. A SIGKILLed flow therefore leaves no trainer behind.
"""

from __future__ import annotations

import os

from pogdiff.process import PARENT_ENV, die_with_parent, tune_gc


def main() -> None:
    die_with_parent()
    tune_gc()
    os.environ[PARENT_ENV] = str(os.getpid())  # inherited by the ranks this launcher starts
    from accelerate.commands.launch import main as accelerate_launch

    accelerate_launch()  # parses sys.argv[1:] as `accelerate launch` does


if __name__ == "__main__":
    main()
