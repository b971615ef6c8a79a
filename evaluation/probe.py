"""Linear probe on frozen features: embed a labeled set once, fit a logistic regression on the
train split, report accuracy and macro-F1 on the test split.

Features are mean-pooled last hidden states (over real tokens for text, over patches for
images), standardized on the train split; the split is stratified and seeded, so the pretrained
encoder and its random-init baseline are scored on exactly the same examples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from transformers import PreTrainedModel


@dataclass
class ProbeResult:
    accuracy: float
    macro_f1: float
    n_train: int
    n_test: int


@torch.no_grad()
def embed(
    model: PreTrainedModel, inputs: dict[str, torch.Tensor], batch_size: int = 128
) -> np.ndarray:
    """[N, D] mean-pooled features."""
    n = next(iter(inputs.values())).shape[0]
    out = []
    for i in range(0, n, batch_size):
        chunk = {k: v[i : i + batch_size] for k, v in inputs.items()}
        hidden = model(**chunk).last_hidden_state  # [B, T, D]
        if "attention_mask" in chunk:
            m = chunk["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
            out.append(((hidden * m).sum(1) / m.sum(1).clamp(min=1)).float().numpy())
        else:
            out.append(hidden[:, 1:].mean(1).float().numpy())  # patches; token 0 is [CLS]
    return np.concatenate(out)


def linear_probe(
    features: np.ndarray, labels: np.ndarray, seed: int = 0, test_size: float = 0.3
) -> ProbeResult:
    x_tr, x_te, y_tr, y_te = train_test_split(
        features, labels, test_size=test_size, random_state=seed, stratify=labels
    )
    scaler = StandardScaler().fit(x_tr)
    clf = LogisticRegression(max_iter=3000, C=1.0)
    clf.fit(scaler.transform(x_tr), y_tr)
    pred = clf.predict(scaler.transform(x_te))
    return ProbeResult(
        accuracy=float(accuracy_score(y_te, pred)),
        macro_f1=float(f1_score(y_te, pred, average="macro")),
        n_train=len(y_tr),
        n_test=len(y_te),
    )


def as_dict(r: ProbeResult) -> dict[str, Any]:
    return {
        "accuracy": r.accuracy,
        "macro_f1": r.macro_f1,
        "n_train": r.n_train,
        "n_test": r.n_test,
    }
