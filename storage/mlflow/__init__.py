"""Everything that talks to MLflow; no other module of the project imports ``mlflow``.

``connection`` (where the store is), ``runs`` (run lifecycle, params, metrics, artifacts),
``metric_sink`` (per-step metrics written in the background), ``lineage`` (dataset inputs, and
their link to the logged model), ``packaging`` (a model as a registered pyfunc, loaded by
``pyfunc_model``), ``registry`` (aliases and promotion, by the rule in ``storage.gate``),
``references`` (what a reviewer names, resolved), ``descriptions`` (the markdown a reviewer reads on
runs, experiments, models and versions) and ``ui`` (links into the MLflow UI).
"""
