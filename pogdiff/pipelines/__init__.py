"""Text-to-image pipelines: a diffusers ``UNet2DConditionModel`` + noise scheduler + frozen text encoder.

Two kinds share one interface (``base.TextToImagePipeline``), so the trainer, the train task and the
evaluation never care which one they hold; ``loader.load_pipeline(ref)`` picks the kind from the folder:

* ``base``: the interface, the image <-> tensor conversions and psi's latent feature;
* ``sampling``: the one classifier-free-guided sampling loop (DDIM or DPM-Solver++) of both kinds;
* ``pixel``: ``PixelDiffusionPipeline``, the UNet works on the images themselves (the embedded default);
* ``sd``: ``StableDiffusionPipeline``, a Stable-Diffusion-format folder whose UNet works on VAE latents;
* ``loader``: ``load_pipeline``, either kind by its folder layout.
"""
