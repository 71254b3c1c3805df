"""Training-side utilities.

`fapecli.training.degrade` synthesises degraded/clean pairs from clean photos: one seeded,
reproducible function per degradation of `fapecli.tasks` (rain, snow, haze, blur, noise,
lowlight, lowres), their physically ordered mixtures (`degrade`), the wide random sampler
used on the fly by the training loop (`random_degradation`, `degrade_tensor`), and a
JSON-serialisable record of every sampled parameter for sidecars and fixed-seed benchmarks.
"""
