"""The pipeline's Prefect flows and its command line.

Every process that runs a flow (``pogdiff``, and the flow-run subprocesses of a Prefect worker or of
``pogdiff serve``) imports this package before torch, MLflow and Prefect's flows: its garbage
collector is tuned here, once, for a process that keeps those libraries (``pogdiff.process.tune_gc``).
"""

from pogdiff.process import tune_gc

tune_gc()
