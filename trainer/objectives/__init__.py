"""Objective registry: a plain dict of names, and the config loading that needs it. Adding an
objective is one file (its Objective subclass and, beside it, its settings dataclass, named by
`settings_class`), one entry here, one config preset in configs/ and one smoke test.

Imports point one way: the objectives import trainer.config, which never imports them. The
config's common sections are built and checked there; `load_config` here hands it the chosen
objective's settings class and adds the objective's own checks (`check_config`)."""

from __future__ import annotations

from pathlib import Path

from darkmatter.trainer.config import (
    Config,
    ConfigError,
    ObjectiveSettings,
    build_config,
    read_config,
    validate,
)
from darkmatter.trainer.objectives.base import Objective
from darkmatter.trainer.objectives.byol import BYOLObjective
from darkmatter.trainer.objectives.clm import CLMObjective
from darkmatter.trainer.objectives.dino import DINOObjective
from darkmatter.trainer.objectives.ijepa import IJEPAObjective
from darkmatter.trainer.objectives.mae import MAEObjective
from darkmatter.trainer.objectives.mlm import MLMObjective
from darkmatter.trainer.objectives.moco import MoCoObjective
from darkmatter.trainer.objectives.simclr import SimCLRObjective
from darkmatter.trainer.objectives.span import SpanObjective
from darkmatter.trainer.objectives.video import VideoObjective
from darkmatter.trainer.objectives.video_future import VideoFutureObjective
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
    "video_future": VideoFutureObjective,
    "wav2vec2": Wav2Vec2Objective,
    "dino": DINOObjective,
    "ijepa": IJEPAObjective,
}


def objective_class(name: str) -> type[Objective]:
    """The registered objective `name`; ConfigError naming the key if there is none."""
    if name not in OBJECTIVES:
        raise ConfigError(f"objective: unknown {name!r} (known: {', '.join(OBJECTIVES)})")
    return OBJECTIVES[name]


def settings_class(name: str) -> type[ObjectiveSettings]:
    """The settings dataclass of objective `name`: the `model:` keys it takes beyond ModelConfig's."""
    return objective_class(name).settings_class


def check_config(cfg: Config) -> None:
    """Every check of a built config: the common sections' (trainer.config.validate), then the
    objective's own, after it has filled in its defaults (so the values checked, and later
    logged, are the ones used)."""
    validate(cfg)
    objective = objective_class(cfg.objective)
    objective.resolve_defaults(cfg)
    objective.validate(cfg)


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply `a.b=c` overrides, build it with its objective's settings and
    check it; every error is a ConfigError naming the dotted key."""
    cfg = build_config(read_config(path, overrides), settings_class)
    check_config(cfg)
    return cfg


__all__ = [
    "OBJECTIVES",
    "Objective",
    "check_config",
    "load_config",
    "objective_class",
    "settings_class",
]
