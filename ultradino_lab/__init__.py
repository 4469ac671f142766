"""A notebook-first workbench for domain-specific ultrasound foundation models: the full DINOv2 recipe, greyscale-native, with the UltraDINO benchmarks.

Modules:

- `ultradino_lab.augment`: Turn one greyscale ultrasound image into DINOv2's 2 global + N local crops, fast, and a batch of them into the collated tensors and iBOT block masks the training step consumes.
- `ultradino_lab.benchmark`: One call runs a whole comparison: backbones × tasks × protocols, inputs checked before any long work, features extracted once per backbone and task, tidy rows appended to `results.csv`, and the paired comparison of the first backbone with each other one — over the same draws, or over the same test images.
- `ultradino_lab.config`: Every setting of a pretraining run as typed dataclasses: defaults, presets, YAML, `key=value` overrides, checks, and the numbers derived from them — computed in one place and saved with the run.
- `ultradino_lab.evaluate`: k-NN, linear probe and logistic regression exactly as DINOv2 evaluates frozen features, the metrics UltraDINO reports, and few-shot draws with mean ± CI — feature arrays and labels in, tidy rows out.
- `ultradino_lab.finetune`: UltraDINO's classification fine-tuning, with the recipe as configured: a ViT, a BatchNorm + linear head on the CLS token, greyscale augmentation, Mixup/CutMix, layer-wise lr decay that is really applied, warm-up + cosine per step, the best epoch by the *maximum* validation macro-F1; tidy rows out; few-shot draws.
- `ultradino_lab.losses`: DINO, iBOT and KoLeo as plain modules, the teacher targets (centering or Sinkhorn-Knopp), and the reference's weighting and logged names: no training loop here.
- `ultradino_lab.meta_arch`: DINOv2's meta-architecture as a thin composition of the parts — backbone, heads, losses, schedules — with the EMA teacher and a training step whose gradient accumulation is exact.
- `ultradino_lab.pretrain`: `pretrain(cfg, run_dir, manifest)`: the whole DINOv2 / UltraDINO recipe on a manifest — one CPU, one GPU or many under `torchrun` — with exact resume, atomic checkpoints, health monitors and a timm-loadable backbone.
- `ultradino_lab.pretrain_data`: An infinite, seeded, rank-sharded stream of micro-batches — multi-crop views and iBOT masks — whose every random draw is a pure function of the seed and the sample's position, so that a run resumes exactly.
- `ultradino_lab.schedules`: Per-iteration lr, weight decay, teacher momentum and temperature with DINOv2's exact array semantics; the last-layer freeze; layer-wise param groups, AdamW, and gradient clipping per student part.
- `ultradino_lab.segment`: Dense features from chosen ViT blocks, a linear head and a small UperNet decoder, CE + Dice training with layer-wise decay, Dice/IoU accumulated over the dataset and per image, the head circumference of a fitted ellipse, few-shot draws — every protocol returns tidy rows.
- `ultradino_lab.stats`: The tidy results table every evaluation writes to, `results.csv` appended atomically, mean ± CI over few-shot draws, and the paired comparison of two backbones over the same draws, rendered like the paper's tables."""

__version__ = "0.0.1"
