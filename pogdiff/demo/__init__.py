"""The demo domain: a catalogue of coloured-shape logos with known attributes, and its exact judge.

- ``catalogue``: the looks, product names, captions and renders, and the base
  model's balanced draw;
- ``folder``: a catalogue written as a caption–image folder (``generate_longtail``), held-out photos marked;
- ``detector``: reads shape and colour back off an image; ``detector.judge`` is the exact judge that
  callers evaluating demo data pass to ``pogdiff.evaluation.evaluate``;
- ``train_set``: the catalogue as an in-memory ``TrainData``, for tests and benchmarks of the trainer.

Nothing else in the library depends on the demo except the builtin base model (``pogdiff.base``),
which is pretrained on the demo domain.
"""
