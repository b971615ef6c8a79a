"""The evaluation protocols of self-supervised learning, on one seeded split:

- linear probe: a logistic regression on frozen, standardized features;
- kNN: cosine similarity on L2-normalized frozen features, the k nearest training examples
  vote with weight exp(similarity / temperature) (Wu et al. 2018; DINO's k=20, T=0.07);
- fine-tuning: the whole encoder and a linear head trained briefly with AdamW.

Features are mean-pooled last hidden states (over real tokens for text, over patches for
images, over the frames of real samples for audio). The split is stratified and seeded, so a
pretrained encoder and its random-init baseline are scored on exactly the same examples.
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
class ProtocolResult:
    accuracy: float
    macro_f1: float
    n_train: int
    n_test: int
    y_true: np.ndarray  # test labels
    y_pred: np.ndarray  # test predictions

    def metrics(self, names: tuple[str, ...] = ("accuracy", "macro_f1")) -> dict[str, float]:
        return {m: float(getattr(self, m)) for m in names}


def scored(y_true: np.ndarray, y_pred: np.ndarray, n_train: int) -> ProtocolResult:
    return ProtocolResult(
        accuracy=float(accuracy_score(y_true, y_pred)),
        macro_f1=float(f1_score(y_true, y_pred, average="macro")),
        n_train=n_train, n_test=len(y_true), y_true=y_true, y_pred=y_pred,
    )  # fmt: skip


def split(
    labels: np.ndarray, test_fraction: float, seed: int, test_mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices): the data's own split if it has one, else stratified."""
    idx = np.arange(len(labels))
    if test_mask is not None:
        return idx[~test_mask], idx[test_mask]
    train, test = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=labels)
    return np.sort(train), np.sort(test)


# The config attribute an objective sets on its encoder's transformers config (so it travels in
# the checkpoint's model_config.json and an export's config.json) when its features are the
# [CLS] token's final state rather than a mean: dino, whose loss trains [CLS] alone.
FEATURE_POOLING = "feature_pooling"


def pool(
    hidden: torch.Tensor, attention_mask: torch.Tensor | None, cls: bool = True,
    use_cls: bool = False,
) -> torch.Tensor:  # fmt: skip
    """[B, T, D] -> [B, D]: the [CLS] token's state with `use_cls`; else the mean over real
    tokens, or over patches (token 0 is [CLS] when `cls`; VideoMAE's tubes have none)."""
    if use_cls:
        return hidden[:, 0]
    if attention_mask is not None:
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    return hidden[:, 1:].mean(1) if cls else hidden.mean(1)


def has_cls(model: Any) -> bool:
    """Whether the encoder's first output is a [CLS] token: the ViTs' embeddings prepend one;
    VideoMAE's first output is a tube and wav2vec2's a frame (they have no cls_token)."""
    return hasattr(getattr(model, "embeddings", None), "cls_token")


def pooled(model: Any, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The features of `model`'s outputs, pooled as its config says (FEATURE_POOLING)."""
    use_cls = getattr(model.config, FEATURE_POOLING, "mean") == "cls" and has_cls(model)
    return pool(hidden, mask, has_cls(model), use_cls)


def output_mask(model: Any, hidden: torch.Tensor, mask: torch.Tensor | None) -> Any:
    """The attention mask over the encoder's outputs: the inputs' own, except for audio, whose
    mask is over samples and whose outputs are frames (transformers' wav2vec2 maps one onto the
    other)."""
    if mask is None or mask.shape[1] == hidden.shape[1]:
        return mask
    return model._get_feature_vector_attention_mask(hidden.shape[1], mask)


@torch.no_grad()
def embed(
    model: PreTrainedModel, inputs: dict[str, torch.Tensor], batch_size: int = 128
) -> np.ndarray:
    """[N, D] features of the frozen encoder."""
    n = next(iter(inputs.values())).shape[0]
    out = []
    for i in range(0, n, batch_size):
        chunk = {k: v[i : i + batch_size] for k, v in inputs.items()}
        hidden = model(**chunk).last_hidden_state
        mask = output_mask(model, hidden, chunk.get("attention_mask"))
        out.append(pooled(model, hidden, mask).float().numpy())
    return np.concatenate(out)


def linear_probe(
    features: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray, C: float = 1.0
) -> ProtocolResult:
    scaler = StandardScaler().fit(features[train])
    clf = LogisticRegression(max_iter=3000, C=C)
    clf.fit(scaler.transform(features[train]), labels[train])
    pred = clf.predict(scaler.transform(features[test]))
    return scored(labels[test], pred, len(train))


def knn(
    features: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray,
    k: int = 20, temperature: float = 0.07,
) -> ProtocolResult:  # fmt: skip
    """Weighted kNN vote on cosine similarity."""
    f = features / np.linalg.norm(features, axis=1, keepdims=True).clip(min=1e-12)
    sim = f[test] @ f[train].T  # [n_test, n_train]
    k = min(k, len(train))
    top = np.argpartition(-sim, k - 1, axis=1)[:, :k]  # the k most similar, any order
    top_sim = np.take_along_axis(sim, top, axis=1)
    weights = np.exp(top_sim / temperature)
    n_classes = int(labels.max()) + 1
    votes = np.zeros((len(test), n_classes))
    np.add.at(votes, (np.arange(len(test))[:, None], labels[train][top]), weights)
    return scored(labels[test], votes.argmax(1), len(train))


def finetune(
    model: PreTrainedModel, inputs: dict[str, torch.Tensor], labels: np.ndarray,
    train: np.ndarray, test: np.ndarray, epochs: int = 2, lr: float = 1e-4,
    batch_size: int = 32, seed: int = 0,
) -> ProtocolResult:  # fmt: skip
    """Train encoder + linear head on the train split (AdamW, cross-entropy), score the test
    split. The model is changed in place: pass a fresh copy."""
    torch.manual_seed(seed)
    n_classes = int(labels.max()) + 1
    head = torch.nn.Linear(model.config.hidden_size, n_classes)
    params = [*model.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    y = torch.as_tensor(labels)
    gen = torch.Generator().manual_seed(seed)

    def logits(rows: np.ndarray) -> torch.Tensor:
        chunk = {k: v[rows] for k, v in inputs.items()}
        hidden = model(**chunk).last_hidden_state
        mask = output_mask(model, hidden, chunk.get("attention_mask"))
        return head(pooled(model, hidden, mask))

    model.train()
    for _ in range(epochs):
        order = train[torch.randperm(len(train), generator=gen).numpy()]
        for i in range(0, len(order), batch_size):
            rows = order[i : i + batch_size]
            loss = torch.nn.functional.cross_entropy(logits(rows), y[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        pred = np.concatenate([
            logits(test[i : i + 128]).argmax(1).numpy() for i in range(0, len(test), 128)
        ])  # fmt: skip
    return scored(labels[test], pred, len(train))


def as_dict(r: ProtocolResult) -> dict[str, Any]:
    return {"accuracy": r.accuracy, "macro_f1": r.macro_f1, "n_train": r.n_train,
            "n_test": r.n_test}  # fmt: skip
