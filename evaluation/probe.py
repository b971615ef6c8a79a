"""The evaluation protocols of self-supervised learning, on one seeded split:

- linear probe: a logistic regression on frozen, standardized features;
- kNN: cosine similarity on L2-normalized frozen features, the k nearest training examples
  vote with weight exp(similarity / temperature) (Wu et al. 2018; DINO's k=20, T=0.07);
- fine-tuning: the whole encoder and a linear head trained briefly with AdamW.

Features are mean-pooled last hidden states (over real tokens for text, over patches for
images, over the frames of real samples for audio). The split is stratified and seeded, so a
pretrained encoder and its random-init baseline are scored on exactly the same examples.

Everything runs a batch at a time on one device (`evaluation.device`: a GPU when there is one,
bf16 autocast there), so memory is bounded by a batch, not by the labeled set: the encoder's
inputs are made per batch (`Batches`), the features go into an array that can live on disk (a
memory-mapped .npy), kNN keeps a running top-k over blocks of the training features, and the
linear probe's L-BFGS sums its loss and gradient over mini-batches of them.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import train_test_split
from transformers import PreTrainedModel


@dataclass
class ProtocolResult:
    accuracy: float
    macro_f1: float
    n_train: int
    n_test: int
    y_true: np.ndarray  # test labels
    y_pred: np.ndarray  # test predictions
    C: float | None = None  # the linear probe's regularization (chosen, under C: auto)

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


def resolve_device(name: str = "auto") -> torch.device:
    """evaluation.device: `auto` (the GPU when torch sees one, else the CPU), `cpu`, `cuda` or
    `cuda:N`; ValueError for a GPU that is not there."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not (name == "cpu" or name == "cuda" or name.startswith("cuda:")):
        raise ValueError(f"evaluation.device: {name!r} is not auto, cpu, cuda or cuda:N")
    if name != "cpu" and not torch.cuda.is_available():
        raise ValueError(f"evaluation.device: {name} asked for, but torch sees no GPU")
    return torch.device(name)


def autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on a GPU (the encoder's matmuls in bf16, its norms and softmax in fp32);
    nothing on the CPU, whose bf16 matmuls are slower than its fp32 ones."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class Batches:
    """The encoder inputs of a labeled set, made a batch at a time: `batches(rows)` is the
    inputs of those rows (a dict of tensors). `of` wraps inputs already made."""

    n: int
    make: Callable[[np.ndarray], dict[str, torch.Tensor]]

    def __len__(self) -> int:
        return self.n

    def __call__(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        return self.make(np.asarray(rows))

    @classmethod
    def of(cls, inputs: Batches | Mapping[str, torch.Tensor]) -> Batches:
        if isinstance(inputs, Batches):
            return inputs
        tensors = dict(inputs)
        n = next(iter(tensors.values())).shape[0]
        return cls(n, lambda rows: {k: v[torch.as_tensor(rows)] for k, v in tensors.items()})


Inputs = Batches | Mapping[str, torch.Tensor]


def _on(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class FeatureFile:
    """[N, D] float32 features in a file (an .npy that np.load reads), written a batch at a
    time and read by rows with plain reads, not a memory map: pages already read or written
    stay in the page cache, not in the evaluator's resident memory, so the features of a set
    of any size cost the evaluator only the rows it is using. `features[rows]` (sorted or not)
    reads the span the rows lie in, a block at a time."""

    def __init__(self, path: str | Path, n: int, dim: int):
        self.path, self.shape = Path(path), (n, dim)
        header = {"descr": "<f4", "fortran_order": False, "shape": self.shape}
        with open(self.path, "wb") as f:
            np.lib.format.write_array_header_1_0(f, header)
            self.offset = f.tell()
            f.truncate(self.offset + n * dim * 4)
        self._file = open(self.path, "r+b")  # noqa: SIM115  (closed by close())

    def __len__(self) -> int:
        return self.shape[0]

    def write(self, start: int, rows: np.ndarray) -> None:
        self._file.seek(self.offset + start * self.shape[1] * 4)
        self._file.write(np.ascontiguousarray(rows, dtype="<f4").tobytes())
        self._file.flush()  # for reads by os.pread and np.load

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        """The features of `rows` (row numbers, any order, repeats allowed), [len(rows), D]."""
        idx = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(idx), self.shape[1]), dtype=np.float32)
        if idx.size == 0:
            return out
        if idx.min() < 0 or idx.max() >= self.shape[0]:
            raise IndexError(f"{self.path}: rows out of range 0..{self.shape[0] - 1}")
        lo, hi = int(idx.min()), int(idx.max()) + 1
        if hi - lo <= 2 * len(idx):  # dense enough: the span in one read
            return self._read(lo, hi)[idx - lo]
        order = np.argsort(idx, kind="stable")  # sparse: each run of consecutive rows
        sorted_idx = idx[order]
        breaks = np.flatnonzero(np.diff(sorted_idx) > 1) + 1
        for run in np.split(np.arange(len(idx)), breaks):
            start, stop = int(sorted_idx[run[0]]), int(sorted_idx[run[-1]]) + 1
            out[order[run]] = self._read(start, stop)[sorted_idx[run] - start]
        return out

    def _read(self, lo: int, hi: int) -> np.ndarray:
        width = self.shape[1] * 4
        data = os.pread(self._file.fileno(), (hi - lo) * width, self.offset + lo * width)
        return np.frombuffer(data, dtype="<f4").reshape(hi - lo, self.shape[1])

    def close(self) -> None:
        self._file.close()


Features = np.ndarray | FeatureFile


class _BatchesDataset(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Batch k of `batches` (rows k·size …), for a DataLoader that makes them in its workers."""

    def __init__(self, batches: Batches, size: int):
        self.batches, self.size = batches, size

    def __len__(self) -> int:
        return -(-len(self.batches) // self.size)

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        return self.batches(np.arange(k * self.size, min((k + 1) * self.size, len(self.batches))))


def loader_workers(device: torch.device, workers: int | None = None) -> int:
    """evaluation.workers: DataLoader processes that read and decode the inputs while the
    encoder runs. Default: none on the CPU (the encoder uses every core), on a GPU one per core
    but one, up to 8 (decoding JPEGs on one core cannot keep a GPU busy)."""
    if workers is not None:
        return workers
    return 0 if device.type == "cpu" else max(1, min(8, (os.cpu_count() or 2) - 1))


@torch.no_grad()
def embed(
    model: PreTrainedModel, inputs: Inputs, batch_size: int = 128, device: Any = "cpu",
    out: str | Path | None = None, workers: int | None = None,
) -> Features:  # fmt: skip
    """[N, D] float32 features of the frozen encoder, computed a batch at a time on `device`,
    in order. The batches come through a DataLoader: made in `workers` processes
    (loader_workers), two ahead each, pinned for a GPU. `out`: a file to hold the features (a
    FeatureFile; the caller closes and removes it), for a set whose features should not live
    in memory."""
    batches, dev = Batches.of(inputs), torch.device(device)
    if len(batches) == 0:
        raise ValueError("no examples to embed")
    torch.nn.Module.to(model, dev)
    n_workers = loader_workers(dev, workers)
    loader = torch.utils.data.DataLoader(
        _BatchesDataset(batches, batch_size), batch_size=None, num_workers=n_workers,
        pin_memory=dev.type == "cuda", prefetch_factor=2 if n_workers else None,
    )  # fmt: skip
    feats: Features | None = None
    for k, made in enumerate(loader):
        start = k * batch_size
        rows = np.arange(start, min(start + batch_size, len(batches)))
        chunk = _on(made, dev)
        with autocast(dev):
            hidden = model(**chunk).last_hidden_state
        mask = output_mask(model, hidden, chunk.get("attention_mask"))
        f = pooled(model, hidden, mask).float().cpu().numpy()
        if feats is None:
            n = len(batches)
            feats = FeatureFile(out, n, f.shape[1]) if out else np.empty((n, f.shape[1]), "f4")
        if isinstance(feats, FeatureFile):
            feats.write(start, f)
        else:
            feats[start : start + len(rows)] = f
    assert feats is not None
    return feats


def _blocks(rows: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def _rows(features: Features, rows: np.ndarray, device: torch.device,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:  # fmt: skip
    """features[rows] on `device`."""
    return torch.from_numpy(np.ascontiguousarray(features[rows])).to(device, dtype)


# linear_probe's C: auto: the grid cross-validated on the training rows (half decades, as
# scikit-learn's LogisticRegressionCV and the linear-probe protocols of SimCLR and CLIP sweep).
C_GRID = tuple(float(c) for c in np.logspace(-3, 1, 9))  # 0.001 … 10
C_FOLDS = 3
CV_TOLERANCE = 1e-4  # the folds' fits: enough to rank the Cs (the final fit: 1e-6)


def linear_probe(
    features: Features, labels: np.ndarray, train: np.ndarray, test: np.ndarray,
    C: float | str = 1.0, block_bytes: int = 4 << 20, device: Any = "cpu", max_iter: int = 3000,
    seed: int = 0,
) -> ProtocolResult:  # fmt: skip
    """A multinomial logistic regression on standardized features: scikit-learn's
    LogisticRegression(C) objective, mean cross-entropy + ||W||² / (2·C·n), intercept
    unpenalized, minimized by L-BFGS whose every evaluation sums the loss and its gradient over
    mini-batches of training rows, `block_bytes` of features each (read again from `features`
    at each evaluation; kept when one block holds them all). Strictly convex: the same optimum
    as scikit-learn's, in memory bounded by a mini-batch. fp64 on the CPU, fp32 on a GPU.

    `C="auto"`: the C of C_GRID with the best mean accuracy over C_FOLDS stratified folds of
    the training rows (`seed`; ties go to the stronger regularization), refitted on all of
    them; the test rows are never seen. A fixed C favours whichever features it happens to
    suit: on the quickstart's WordNet task, C=1 overfits a random-init BERT's features (0.477;
    0.550 at its validated C), which inflates a pretrained encoder's margin. The result's `C`
    says which was used."""
    dev = torch.device(device)
    dtype = torch.float64 if dev.type == "cpu" else torch.float32
    rows_per_block = max(256, block_bytes // (features.shape[1] * dtype.itemsize))
    y_all = torch.as_tensor(labels, device=dev)
    n_classes = int(labels.max()) + 1
    fit = functools.partial(_fit_logistic, features, y_all, n_classes, dev=dev, dtype=dtype,
                            rows_per_block=rows_per_block, max_iter=max_iter)  # fmt: skip
    chosen = _validated_C(fit, labels, train, seed) if C == "auto" else float(C)
    result = scored(labels[test], fit(train, chosen)(test), len(train))
    result.C = chosen
    return result


def _validated_C(fit: Callable[..., Any], labels: np.ndarray, train: np.ndarray,
                 seed: int) -> float:  # fmt: skip
    from sklearn.model_selection import StratifiedKFold

    counts = np.bincount(labels[train])
    folds = min(C_FOLDS, int(counts[counts > 0].min()))
    if folds < 2:
        raise ValueError("linear_probe C: auto needs at least 2 training examples of each "
                         "class to validate C; give a number")  # fmt: skip
    split = StratifiedKFold(folds, shuffle=True, random_state=seed)
    correct = np.zeros(len(C_GRID))
    for inner, held in split.split(train, labels[train]):
        start = None  # warm start along the grid: each C from the previous C's optimum
        for i, c in enumerate(C_GRID):
            predict = fit(train[inner], c, start=start, tolerance=CV_TOLERANCE)
            start = predict.weights
            correct[i] += (predict(train[held]) == labels[train[held]]).sum()
    return C_GRID[int(np.argmax(correct))]  # the first best: the strongest regularization


def _fit_logistic(
    features: Features, y_all: torch.Tensor, n_classes: int, rows: np.ndarray, C: float,
    dev: torch.device, dtype: torch.dtype, rows_per_block: int, max_iter: int,
    start: tuple[torch.Tensor, torch.Tensor] | None = None, tolerance: float = 1e-6,
) -> Callable[[np.ndarray], np.ndarray]:  # fmt: skip
    """linear_probe's fit on `rows`: a predict(rows) function, its (W, b) as `.weights`."""
    blocks = list(_blocks(rows, rows_per_block))
    # The standardization: mean and population std of the training rows, 1 where constant.
    total = torch.zeros(features.shape[1], dtype=torch.float64, device=dev)
    squares = torch.zeros_like(total)
    for block in blocks:
        x = _rows(features, block, dev, torch.float64)
        total += x.sum(0)
        squares += (x * x).sum(0)
        del x
    mean = total / len(rows)
    std = (squares / len(rows) - mean * mean).clamp(min=0).sqrt()
    std = torch.where(std > 1e-12 * mean.abs().clamp(min=1), std, torch.ones_like(std))
    mean, std = mean.to(dtype), std.to(dtype)

    def standardized(block: np.ndarray) -> torch.Tensor:
        return (_rows(features, block, dev, dtype) - mean) / std

    # One block: standardized once and kept; more: read again at each evaluation.
    kept = standardized(blocks[0]) if len(blocks) == 1 else None
    W = torch.zeros(n_classes, features.shape[1], dtype=dtype, device=dev)
    b = torch.zeros(n_classes, dtype=dtype, device=dev)
    if start is not None:
        W.copy_(start[0])
        b.copy_(start[1])
    W.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, tolerance_grad=tolerance,
                            tolerance_change=1e-12, history_size=20,
                            line_search_fn="strong_wolfe")  # fmt: skip

    def objective() -> torch.Tensor:
        opt.zero_grad()
        value = torch.zeros((), dtype=dtype, device=dev)
        for block in blocks:
            x = kept if kept is not None else standardized(block)
            logits = x @ W.T + b
            loss = torch.nn.functional.cross_entropy(logits, y_all[block], reduction="sum")
            (loss / len(rows)).backward()
            value += loss.detach() / len(rows)
        reg = (W * W).sum() / (2 * C * len(rows))
        reg.backward()
        return value + reg.detach()

    opt.step(objective)  # type: ignore[no-untyped-call]
    weights = (W.detach(), b.detach())

    def predict(rows: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return np.concatenate([
                (standardized(block) @ weights[0].T + weights[1]).argmax(1).cpu().numpy()
                for block in _blocks(rows, rows_per_block)
            ])  # fmt: skip

    predict.weights = weights  # type: ignore[attr-defined]
    return predict


@torch.no_grad()
def knn(
    features: Features, labels: np.ndarray, train: np.ndarray, test: np.ndarray,
    k: int = 20, temperature: float = 0.07, queries: int = 256, keys: int = 2048,
    device: Any = "cpu",
) -> ProtocolResult:  # fmt: skip
    """Weighted kNN vote on cosine similarity, by blocks: for `queries` test rows at a time,
    the similarities to `keys` training rows at a time (2 MiB of them by default), merged into
    a running top-k (torch.topk), so no N×M matrix is ever made."""
    dev = torch.device(device)
    k = min(k, len(train))
    n_classes = int(labels.max()) + 1
    train_labels = torch.as_tensor(labels[train], device=dev)

    def unit(rows: np.ndarray) -> torch.Tensor:
        x = _rows(features, rows, dev)
        return x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)

    preds = []
    for asked in _blocks(test, queries):
        q = unit(asked)
        best = torch.empty(len(asked), 0, device=dev)
        where = torch.empty(len(asked), 0, dtype=torch.long, device=dev)
        for start in range(0, len(train), keys):
            known = train[start : start + keys]
            sims = q @ unit(known).T
            index = torch.arange(start, start + len(known), device=dev).expand(len(asked), -1)
            merged, merged_at = torch.cat([best, sims], 1), torch.cat([where, index], 1)
            best, pos = merged.topk(min(k, merged.shape[1]), dim=1)
            where = merged_at.gather(1, pos)
        votes = torch.zeros(len(asked), n_classes, dtype=torch.float64, device=dev)
        votes.scatter_add_(1, train_labels[where], torch.exp(best.double() / temperature))
        preds.append(votes.argmax(1).cpu().numpy())
    return scored(labels[test], np.concatenate(preds), len(train))


def finetune(
    model: PreTrainedModel, inputs: Inputs, labels: np.ndarray,
    train: np.ndarray, test: np.ndarray, epochs: int = 2, lr: float = 1e-4,
    batch_size: int = 32, seed: int = 0, device: Any = "cpu",
) -> ProtocolResult:  # fmt: skip
    """Train encoder + linear head on the train split (AdamW, cross-entropy), score the test
    split, on `device` (bf16 autocast on a GPU). The model is changed in place: pass a fresh
    copy."""
    torch.manual_seed(seed)
    batches, dev = Batches.of(inputs), torch.device(device)
    n_classes = int(labels.max()) + 1
    torch.nn.Module.to(model, dev)
    head = torch.nn.Linear(model.config.hidden_size, n_classes).to(dev)
    params = [*model.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    y = torch.as_tensor(labels, device=dev)
    gen = torch.Generator().manual_seed(seed)

    def logits(rows: np.ndarray) -> torch.Tensor:
        chunk = _on(batches(rows), dev)
        with autocast(dev):
            hidden = model(**chunk).last_hidden_state
        mask = output_mask(model, hidden, chunk.get("attention_mask"))
        return head(pooled(model, hidden, mask).float())

    model.train()
    for _ in range(epochs):
        order = train[torch.randperm(len(train), generator=gen).numpy()]
        for rows in _blocks(order, batch_size):
            loss = torch.nn.functional.cross_entropy(logits(rows), y[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        pred = np.concatenate([logits(rows).argmax(1).cpu().numpy() for rows in _blocks(test, 128)])
    return scored(labels[test], pred, len(train))


def as_dict(r: ProtocolResult) -> dict[str, Any]:
    return {"accuracy": r.accuracy, "macro_f1": r.macro_f1, "n_train": r.n_train,
            "n_test": r.n_test}  # fmt: skip
