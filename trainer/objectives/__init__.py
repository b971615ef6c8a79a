"""Objective registry: a plain dict of names. Adding an objective is one file, one entry here, one
config preset in configs/ and one smoke test."""

from __future__ import annotations

from darkmatter.trainer.objectives.base import Objective
from darkmatter.trainer.objectives.byol import BYOLObjective
from darkmatter.trainer.objectives.clm import CLMObjective
from darkmatter.trainer.objectives.mae import MAEObjective
from darkmatter.trainer.objectives.mlm import MLMObjective
from darkmatter.trainer.objectives.moco import MoCoObjective
from darkmatter.trainer.objectives.simclr import SimCLRObjective
from darkmatter.trainer.objectives.span import SpanObjective
from darkmatter.trainer.objectives.video import VideoObjective
from darkmatter.trainer.objectives.wav2vec2 import Wav2Vec2Objective

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
