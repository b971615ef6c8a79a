"""Objective registry: a plain dict of names. Adding an objective is one file, one entry here, one
config preset in configs/ and one smoke test."""

from __future__ import annotations

from trainer.objectives.base import Objective
from trainer.objectives.byol import BYOLObjective
from trainer.objectives.clm import CLMObjective
from trainer.objectives.mae import MAEObjective
from trainer.objectives.mlm import MLMObjective
from trainer.objectives.moco import MoCoObjective
from trainer.objectives.simclr import SimCLRObjective
from trainer.objectives.span import SpanObjective
from trainer.objectives.video import VideoObjective
from trainer.objectives.wav2vec2 import Wav2Vec2Objective

OBJECTIVES: dict[str, type[Objective]] = {
    "mlm": MLMObjective,
    "mae": MAEObjective,
    "clm": CLMObjective,
    "span": SpanObjective,
    "simclr": SimCLRObjective,
    "moco": MoCoObjective,
    "byol": BYOLObjective,
    "video": VideoObjective,
    "wav2vec2": Wav2Vec2Objective,
}

__all__ = ["OBJECTIVES", "Objective"]
