"""A notebook-first workbench for domain-specific ultrasound foundation models: the full DINOv2 recipe, greyscale-native, with the UltraDINO benchmarks.

Modules:

- `ultradino_lab.augment`: Turn one greyscale ultrasound image into DINOv2's 2 global + N local crops, fast, and a batch of them into the collated tensors and iBOT block masks the training step consumes.
- `ultradino_lab.config`: Every setting of a pretraining run as typed dataclasses: defaults, presets, YAML, `key=value` overrides, checks, and the numbers derived from them — computed in one place and saved with the run.
- `ultradino_lab.losses`: DINO, iBOT and KoLeo as plain modules, the teacher targets (centering or Sinkhorn-Knopp), and the reference's weighting and logged names: no training loop here.
- `ultradino_lab.schedules`: Per-iteration lr, weight decay, teacher momentum and temperature with DINOv2's exact array semantics; the last-layer freeze; layer-wise param groups, AdamW, and gradient clipping per student part."""

__version__ = "0.0.1"
