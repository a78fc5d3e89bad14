"""Training and inner knowledge distillation: the fine-tune that follows pruning.

`fit` trains a model (a spec or an artifact) on a labelled data spec, optionally under a
frozen teacher (its parent) with inner (per-stage feature) and logit distillation, in one
process or under torchrun with DDP, checkpointing every epoch so a run can be resumed.
"""

from kpc.train.loop import FitResult, TrainSettings, fit

__all__ = ["FitResult", "TrainSettings", "fit"]
