"""The evaluation harness: checkpoints in, downstream numbers out, into the training run.

`evaluate_checkpoint` runs every task's protocols on one checkpoint and on a random-init twin of
its encoder (computed once per task and architecture, shared through the state folder).
`Harness` watches MLflow: for each run (every page of the search) it reads the
`checkpoints/index.json` artifact the trainer keeps, skips what already has results, claims a
checkpoint (evaluation.claims), evaluates it and logs `eval/<task>/<protocol>/<metric>` at the
checkpoint's step, then the plots and the results table, then the tag `eval.<tag>` that marks it
done. A checkpoint whose files do not verify is tagged `eval.<tag> = corrupt: …` and skipped;
nothing without a commit record is ever loaded.

The index is data anyone with write access to the run can change: a uri in it (or its root) is
only followed under the trusted roots (`evaluation.trusted_roots`; by default the run's own
checkpoint root from its params and its MLflow artifact root). Anything else is refused, named
in the log and tagged `eval.<tag> = refused: …`; nothing is read from it.

Exactly once: the metrics go in one request; a harness killed after it and before the tag finds
them at the next look and adds only the plots, the table and the tag.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import posixpath
import re
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import darkmatter.trainer.checkpoint_reader as reader
from darkmatter import storage
from darkmatter.evaluation import claims as cl
from darkmatter.evaluation.checkpoints import (
    EncoderRef,
    ExportRef,
    encoder_config,
    evaluation_weights,
    forget_weights,
    load_encoder,
)
from darkmatter.evaluation.probe import (
    Batches,
    FeatureFile,
    Features,
    embed,
    finetune,
    knn,
    linear_probe,
    resolve_device,
    split,
)
from darkmatter.evaluation.runs import search_all_runs
from darkmatter.evaluation.tasks import (
    LabeledSet,
    TaskSpec,
    audio_inputs,
    export_text_inputs,
    image_inputs,
    load_labeled,
    load_tokenizer,
    text_inputs,
    video_inputs,
)
from darkmatter.storage import failpoints
from darkmatter.trainer.checkpoint_reader import CheckpointError, CheckpointRef

log = logging.getLogger("darkmatter.evaluation")
DONE_PREFIX = "eval."  # tag eval.<tag>: "done", "corrupt: …", "skipped: …" or "refused: …"


@dataclass
class Outcome:
    """What one checkpoint's evaluation produced."""

    step: int
    metrics: dict[str, float]  # eval/<task>/<protocol>/<metric>[_random_init] -> value
    rows: list[dict[str, Any]]  # one per (task, protocol, metric), for the results table
    plots: dict[str, bytes]  # artifact path -> PNG
    timings: dict[str, float] = field(default_factory=dict)  # <task>/features_per_s


# (items, the task's index of items[0]) -> the encoder's inputs for them
Make = Callable[[list[Any], int], dict[str, Any]]


def _text_inputs(ref: EncoderRef) -> Make:
    if isinstance(ref, ExportRef):
        from transformers import AutoTokenizer

        export_tok = AutoTokenizer.from_pretrained(str(ref.path))
        return lambda texts, first: export_text_inputs(texts, export_tok)
    tok = load_tokenizer(ref.tokenizer_url, int(ref.meta["data"]["seq_len"]))
    return lambda texts, first: text_inputs(texts, tok)


def _image_inputs(ref: EncoderRef) -> Make:
    if isinstance(ref, ExportRef):
        size = int(encoder_config(ref).image_size)
    else:
        size = int(ref.meta["data"]["image_size"])
    return lambda images, first: image_inputs(images, size)


def _audio_inputs(ref: EncoderRef) -> Make:
    from darkmatter.trainer.config import DataConfig

    seconds = float(ref.meta.get("data", {}).get("audio_seconds", DataConfig.audio_seconds))
    mask_length = int(encoder_config(ref).mask_time_length)
    return lambda clips, first: audio_inputs(clips, seconds, mask_length, first)


def _video_inputs(ref: EncoderRef) -> Make:
    from darkmatter.trainer.config import DataConfig

    config, data = encoder_config(ref), ref.meta.get("data", {})
    stride = int(data.get("frame_stride", DataConfig.frame_stride))
    frames, size = int(config.num_frames), int(config.image_size)
    return lambda clips, first: video_inputs(clips, frames, stride, size, first)


# How each kind of labeled input becomes an encoder's inputs (keys: evaluation.tasks.KINDS).
INPUTS: dict[str, Callable[[EncoderRef], Make]] = {
    "text": _text_inputs,
    "image": _image_inputs,
    "audio": _audio_inputs,
    "video": _video_inputs,
}


def _inputs(ref: EncoderRef, data: LabeledSet) -> Batches:
    """The labeled set's encoder inputs, made a batch at a time (the tokenizer or sizes read
    once)."""
    if data.kind != ref.modality:
        raise ValueError(f"{ref.path}: task {data.name} has {data.kind} inputs but this is "
                         f"{'an' if ref.modality[0] in 'aeiou' else 'a'} {ref.modality} encoder")  # fmt: skip
    make = INPUTS[data.kind](ref)
    return Batches(len(data.items), lambda rows: make(data.take(rows), int(rows[0])))


Weights = dict[str, Any]  # a checkpoint's consolidated state dict (None: an export's own)


def _protocols(
    spec: TaskSpec, ref: EncoderRef, pretrained: bool, feats: Features, inputs: Batches,
    data: LabeledSet, train: np.ndarray, test: np.ndarray, device: Any,
    weights: Weights | None = None,
) -> dict[str, Any]:  # fmt: skip
    out = {}
    for protocol in spec.protocols:
        opts = spec.options(protocol)
        if protocol == "linear_probe":
            C = opts["C"] if opts["C"] == "auto" else float(opts["C"])
            out[protocol] = linear_probe(feats, data.labels, train, test, C=C, device=device,
                                         seed=spec.seed)  # fmt: skip
        elif protocol == "knn":
            out[protocol] = knn(feats, data.labels, train, test, k=int(opts["k"]),
                                temperature=float(opts["temperature"]), device=device)  # fmt: skip
        else:
            model = load_encoder(ref, pretrained=pretrained, seed=spec.seed, state_dict=weights)
            out[protocol] = finetune(
                model, inputs, data.labels, train, test, epochs=int(opts["epochs"]),
                lr=float(opts["lr"]), batch_size=int(opts["batch_size"]), seed=spec.seed,
                device=device,
            )  # fmt: skip
    return out


def _reported(spec: TaskSpec, protocol: str) -> tuple[str, ...]:
    """The task's metrics, and the linear probe's C where it was chosen (C: auto)."""
    chosen = protocol == "linear_probe" and spec.options(protocol)["C"] == "auto"
    return (*spec.metrics, "C") if chosen else spec.metrics


def _baseline_key(ref: EncoderRef, spec: TaskSpec) -> str:
    """Same architecture, same task, same protocols and split: same random-init numbers."""
    arch = ref.config_file.read_bytes()
    desc = json.dumps([spec.name, spec.data, spec.protocols, spec.seed, spec.test_fraction,
                       spec.split_column, ref.meta.get("data")], sort_keys=True)  # fmt: skip
    return hashlib.sha256(arch + desc.encode()).hexdigest()[:20]


PLOTTED = 1000  # test examples at most in the PCA plot (a seeded sample of a larger test set)


def evaluate_checkpoint(
    ref: EncoderRef, specs: list[TaskSpec], state: str = "", should_stop: Any = None,
    weights: Weights | None = None, device: str = "auto", workers: int | None = None,
) -> Outcome:  # fmt: skip
    """Every task's protocols on `ref`'s encoder, and on its random-init twin (cached under
    `state`/baselines when a state folder is given). `weights`: a checkpoint's consolidated
    state dict, when the caller has it (else it is consolidated here): once for every task.
    `device`: evaluation.device (probe.resolve_device); `workers`: evaluation.workers, the
    processes that make the inputs (probe.loader_workers). The features live in a temporary
    .npy file per task and encoder, memory-mapped: memory does not grow with the task's size."""
    dev = resolve_device(device)
    if weights is None and isinstance(ref, CheckpointRef):
        weights = reader.module_state_dict(ref)
    metrics: dict[str, float] = {}
    rows: list[dict[str, Any]] = []
    plots: dict[str, bytes] = {}
    timings: dict[str, float] = {}
    for spec in specs:
        if should_stop and should_stop():
            raise InterruptedError("stopping")
        data = load_labeled(spec)
        inputs = _inputs(ref, data)
        train, test = split(data.labels, spec.test_fraction, spec.seed, data.test_mask)
        with contextlib.closing(data), tempfile.TemporaryDirectory(
            prefix="darkmatter-features-"
        ) as tmp:  # fmt: skip
            encoder = load_encoder(ref, pretrained=True, state_dict=weights, share=True)
            t0 = time.perf_counter()
            feats = embed(encoder, inputs, device=dev, out=Path(tmp, "pretrained.npy"),
                          workers=workers)  # fmt: skip
            timings[f"{spec.name}/features_per_s"] = len(inputs) / (time.perf_counter() - t0)
            del encoder
            release_memory()
            try:
                results = _protocols(spec, ref, True, feats, inputs, data, train, test, dev,
                                     weights)  # fmt: skip
                baseline = _baseline(ref, spec, state, inputs, data, train, test, dev, Path(tmp),
                                     workers)  # fmt: skip
                shown = test
                if len(test) > PLOTTED:
                    shown = np.sort(np.random.default_rng(spec.seed).choice(test, PLOTTED, False))
                projection = projection_png(feats[shown], data.labels[shown], data, spec, ref.step)
            finally:
                _close(feats)
        for protocol, r in results.items():
            for m in _reported(spec, protocol):
                key = f"eval/{spec.name}/{protocol}/{m}"
                metrics[key] = float(getattr(r, m))
                metrics[key + "_random_init"] = baseline[protocol][m]
                rows.append({"task": spec.name, "protocol": protocol, "metric": m,
                             "value": metrics[key], "random_init": baseline[protocol][m],
                             "n_train": r.n_train, "n_test": r.n_test})  # fmt: skip
        first = next(iter(results))
        folder = f"eval/{spec.name}/{ref.tag}"
        plots[f"{folder}/confusion_{first}.png"] = confusion_png(results[first], data, spec, first)
        plots[f"{folder}/embedding_pca.png"] = projection
    return Outcome(ref.step, metrics, rows, plots, timings)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def return_freed_memory_promptly() -> None:
    """For the evaluator's process (its CLI calls it first): every allocation above 128 KiB is
    mapped on its own and unmapped when freed, so resident memory falls back after each encoder
    and batch. glibc's default raises that threshold up to 32 MiB as large blocks are freed,
    and a long-running harness then keeps its high-water mark in its heap (bench/eval_memory.py:
    the peak fell by a fifth). Not glibc: nothing to do. Arrow's reads use the same allocator
    instead of Arrow's jemalloc pool, which keeps what they free."""
    import contextlib
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    # Arrow's own pool (jemalloc) keeps what the Parquet reads freed: +12 MB at 3,200
    # definitions where the system allocator, set up as above, kept 3 (bench/eval_memory.py).
    import pyarrow as pa

    pa.set_memory_pool(pa.system_memory_pool())


def release_memory() -> None:
    """Give freed memory back to the system (glibc keeps a freed encoder's pages in its heap:
    the next encoder then comes on top of them, bench/eval_memory.py)."""
    import contextlib
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _close(feats: Features) -> None:
    if isinstance(feats, FeatureFile):
        feats.close()


def _baseline(
    ref: EncoderRef, spec: TaskSpec, state: str, inputs: Batches, data: LabeledSet,
    train: np.ndarray, test: np.ndarray, device: Any, tmp: Path, workers: int | None = None,
) -> dict[str, dict[str, float]]:  # fmt: skip
    url = storage.join(state, "baselines", f"{spec.name}-{_baseline_key(ref, spec)}.json")
    if state and storage.exists(url):
        cached: dict[str, dict[str, float]] = json.loads(storage.read_bytes(url))
        return cached
    encoder = load_encoder(ref, pretrained=False, seed=spec.seed)
    feats = embed(encoder, inputs, device=device, out=tmp / "random_init.npy", workers=workers)
    del encoder
    release_memory()
    try:
        results = _protocols(spec, ref, False, feats, inputs, data, train, test, device)
    finally:
        _close(feats)
    out = {p: r.metrics(_reported(spec, p)) for p, r in results.items()}
    if state:  # another harness may have written it meanwhile: the same numbers, either wins
        storage.write_if(url, json.dumps(out).encode(), None)
    return out


def confusion_png(r: Any, data: LabeledSet, spec: TaskSpec, protocol: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import confusion_matrix

    n = int(data.labels.max()) + 1
    cm = confusion_matrix(r.y_true, r.y_pred, labels=list(range(n)))
    names = data.classes or [str(i) for i in range(n)]
    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * n, 1.0 + 0.5 * n))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), names, rotation=90, fontsize=7)
    ax.set_yticks(range(n), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{spec.name}: {protocol}, accuracy {r.accuracy:.3f}", fontsize=9)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=6)
    return _png(fig)


def projection_png(feats: np.ndarray, labels: np.ndarray, data: LabeledSet, spec: TaskSpec,
                   step: int) -> bytes:  # fmt: skip
    """The test set's features projected on their two principal components."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    xy = PCA(n_components=2, svd_solver="randomized", random_state=0).fit_transform(feats)
    fig, ax = plt.subplots(figsize=(6, 5))
    for c in np.unique(labels):
        pts = xy[labels == c]
        name = data.classes[c] if data.classes else str(c)
        ax.scatter(pts[:, 0], pts[:, 1], s=6, label=name)
    ax.set_title(f"{spec.name}: test features, PCA, step {step}", fontsize=9)
    ax.legend(fontsize=6, markerscale=2)
    return _png(fig)


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


# -- watching MLflow --------------------------------------------------------------------------


@dataclass
class Pending:
    """A committed checkpoint of a run, from its checkpoint index."""

    run_id: str
    tag: str
    step: int
    uri: str
    root: str
    refused: str = ""  # why it must not be read (outside the trusted roots), or ""


_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):(.*)", re.DOTALL)


def _normalized(uri: str) -> tuple[str, str]:
    """(scheme, absolute path) with `.`, `..` and repeated slashes resolved, and a local path's
    symlinks: what a containment check may compare (`s3://b/ckpt/../x` is `s3`, `/b/x`)."""
    m = _SCHEME.fullmatch(uri)
    if m is None or m.group(1).lower() == "file":
        return "file", os.path.realpath(uri.removeprefix("file://"))
    return m.group(1).lower(), posixpath.normpath("/" + m.group(2).lstrip("/"))


def within(uri: str, root: str) -> bool:
    """Whether `uri` is `root` or lies under it (same scheme, after normalizing both)."""
    (scheme, path), (root_scheme, root_path) = _normalized(uri), _normalized(root)
    return scheme == root_scheme and (path == root_path
                                      or path.startswith(root_path.rstrip("/") + "/"))  # fmt: skip


def _refusal(tag: str, uris: list[str], roots: list[str]) -> str:
    """Why an index entry must not be followed, or "" when it may be."""
    if not re.fullmatch(r"[\w.-]+", tag) or tag in (".", ".."):
        return f"checkpoint tag {tag!r} is not a plain name"
    for uri in uris:
        if not any(within(uri, r) for r in roots):
            return (f"{uri} is outside the trusted roots ({', '.join(roots) or 'none'}; "
                    "evaluation.trusted_roots)")  # fmt: skip
    return ""


class RunArtifacts:
    """The training run's MLflow artifacts, folder eval/weights, as a WeightsStore
    (--weights-artifact): the first harness to read a checkpoint's weights publishes its cache
    file there, and a harness on another machine downloads that one file instead of the
    checkpoint's (under ZeRO-3 without checkpoint.module_weights: instead of every rank's
    optimizer states and their consolidation)."""

    FOLDER = "eval/weights"

    def __init__(self, client: Any, run_id: str):
        self.client, self.run_id = client, run_id

    def fetch(self, name: str, dest: Path) -> bool:
        from mlflow.exceptions import MlflowException

        with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
            try:
                got = self.client.download_artifacts(self.run_id, f"{self.FOLDER}/{name}", tmp)
            except (MlflowException, OSError):
                return False  # not published (yet)
            os.replace(got, dest)
        log.info("weights %s from run %s's artifacts", name, self.run_id)
        return True

    def publish(self, path: Path) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.log_artifact(self.run_id, str(path), self.FOLDER)
        except (MlflowException, OSError) as e:  # the next harness reads the checkpoint instead
            log.warning("could not publish %s to run %s: %s", path.name, self.run_id, e)


class Harness:
    """Watches MLflow runs and evaluates their committed checkpoints.

    client: an MlflowClient. specs: the tasks. state: claims and shared baselines (URL or
    folder; default CHECKPOINT_ROOT/_eval). cache_dir: where remote checkpoints are downloaded.
    owner: this harness's name in claims. ttl_s: a claim not renewed for this long is taken
    over. order: "oldest" or "newest" first. trusted_roots (evaluation.trusted_roots): the only
    roots checkpoints are read from; empty: each run's own checkpoint root and artifact root.
    device: evaluation.device (auto, cpu, cuda, cuda:N). workers: evaluation.workers (None:
    probe.loader_workers' default). weights_artifact: share each
    checkpoint's weights cache file through the run's artifacts (RunArtifacts).
    """

    def __init__(
        self, client: Any, specs: list[TaskSpec], state: str = "", cache_dir: str = "",
        owner: str = "", ttl_s: float = 300.0, order: str = "oldest",
        trusted_roots: tuple[str, ...] = (), device: str = "auto", weights_artifact: bool = False,
        workers: int | None = None,
    ):  # fmt: skip
        resolve_device(device)  # a GPU asked for and absent fails at start
        self.client, self.specs, self.state, self.device = client, specs, state, device
        self.weights_artifact, self.workers = weights_artifact, workers
        self.cache_dir, self.ttl_s, self.order = cache_dir, ttl_s, order
        self.trusted_roots = tuple(trusted_roots)
        self.owner = owner or cl.harness_id()
        self.stop = threading.Event()
        self.first_key = (
            f"eval/{specs[0].name}/{next(iter(specs[0].protocols))}/" + specs[0].metrics[0]
        )

    # -- discovery
    def runs(self, target: str) -> list[Any]:
        """The run `target` names (a run id), or every run of the experiment it names."""
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(target)
        if exp is not None:
            return search_all_runs(self.client, [exp.experiment_id])
        try:
            return [self.client.get_run(target)]
        except MlflowException:
            raise ValueError(f"{target}: neither an MLflow experiment name nor a run id") from None

    def pending(self, run: Any) -> list[Pending]:
        """Committed checkpoints of `run` without a result yet, in the configured order."""
        from mlflow.exceptions import MlflowException

        rid = run.info.run_id
        with tempfile.TemporaryDirectory() as tmp:
            try:
                got = self.client.download_artifacts(rid, "checkpoints/index.json", tmp)
            except (MlflowException, OSError):
                return []  # no checkpoint committed yet
            text = Path(got).read_text()
        done = {k.removeprefix(DONE_PREFIX) for k in run.data.tags if k.startswith(DONE_PREFIX)}
        roots = self.roots(run)
        try:
            index = json.loads(text)
            root = str(index["root"])
            entries = [(str(e["tag"]), int(e["step"]), str(e["uri"])) for e in index["checkpoints"]]
        except (KeyError, TypeError, ValueError) as e:
            log.error("run %s: checkpoints/index.json is malformed (%s: %s): not evaluating it",
                      rid, type(e).__name__, e)  # fmt: skip
            return []
        out = [Pending(rid, tag, step, uri, root, _refusal(tag, [root, uri], roots))
               for tag, step, uri in entries if tag not in done]  # fmt: skip
        out.sort(key=lambda p: p.step, reverse=self.order == "newest")
        return out

    def roots(self, run: Any) -> list[str]:
        """Where `run`'s checkpoints may be read from: evaluation.trusted_roots when given, else
        the run's own checkpoint root (its `checkpoint.root` param, or `train.run_dir`/checkpoints
        as the trainer defaults it) and the run's MLflow artifact root."""
        if self.trusted_roots:
            return list(self.trusted_roots)
        params = run.data.params
        own = params.get("checkpoint.root") or ""
        if not own and params.get("train.run_dir"):
            own = storage.join(params["train.run_dir"], "checkpoints")
        return [r for r in (own, run.info.artifact_uri) if r]

    def _state(self, p: Pending) -> str:
        return self.state or storage.join(p.root, "_eval")

    # -- one checkpoint
    def process(self, p: Pending) -> str:
        """Claim it; locate and fetch the checkpoint and read its weights (the module's, once:
        cached by commit digest, every task and protocol reuses them); run every task; report. Returns what happened: done, completed (a
        predecessor's metrics were there: plots, table and tag added), corrupt, skipped, claimed
        elsewhere, already done, refused (outside the trusted roots: nothing read), stopped."""
        if p.refused:
            return self._refuse(p)
        claim = self._claim(p)
        if claim is None:
            return "claimed elsewhere"
        try:
            if DONE_PREFIX + p.tag in self.client.get_run(p.run_id).data.tags:
                return "already done"
            # A harness that died between its metrics and its tag left the metrics: they stand,
            # and only the plots, the table and the tag are made here.
            logged = self._metrics_logged(p)
            try:
                loc = reader.locate(p.uri)
                ref = reader.fetch(loc, self.cache_dir, weights="none")
            except (CheckpointError, FileNotFoundError) as e:
                verdict = self._unusable(p, e)
                claim.complete()
                return verdict
            # Still ours? A harness that stalled past its lease (a GC pause, a stopped VM) must
            # not spend an evaluation on a checkpoint another harness has taken over.
            if not claim.renew():
                return "claimed elsewhere"
            log.info("evaluating %s (step %d) of run %s", p.tag, p.step, p.run_id)
            t0 = time.perf_counter()
            try:  # a file refused as unsafe (it would run code) is unusable, not fatal
                store = RunArtifacts(self.client, p.run_id) if self.weights_artifact else None
                weights = evaluation_weights(loc, ref, self.cache_dir, store)
            except (CheckpointError, FileNotFoundError) as e:
                verdict = self._unusable(p, e)
                claim.complete()
                return verdict
            try:
                outcome = evaluate_checkpoint(ref, self.specs, self._state(p),
                                              self.stop.is_set, weights, self.device,
                                              self.workers)  # fmt: skip
            finally:  # evaluated once: its cached files are not read again here
                del weights
                forget_weights(loc, ref, self.cache_dir)
            if claim.lost or not claim.renew():
                log.warning("lost the claim on %s: not reporting", p.uri)
                return "claimed elsewhere"
            self.report(p, outcome, time.perf_counter() - t0, metrics=not logged)
            claim.complete()
            return "completed" if logged else "done"
        except InterruptedError:
            return "stopped"
        finally:
            claim.release()  # a no-op once completed, or when another harness holds it now

    def _refuse(self, p: Pending) -> str:
        """Record a checkpoint the index points at outside the trusted roots; read nothing."""
        from mlflow.exceptions import MlflowException

        log.error("refusing checkpoint %s of run %s: %s (nothing is read from it)", p.tag,
                  p.run_id, p.refused)  # fmt: skip
        try:
            self._tag(p, f"refused: {p.refused}"[:4900])
        except MlflowException as e:  # e.g. a tag that is no valid MLflow key: logged only
            log.warning("could not tag run %s as refused for %r: %s", p.run_id, p.tag, e)
        return "refused"

    def _claim(self, p: Pending) -> cl.Claim | None:
        url = storage.join(self._state(p), "claims", p.run_id, p.tag + ".json")
        claim = cl.try_claim(url, self.owner, self.ttl_s)
        if claim is not None:
            claim.keep_alive()
        return claim

    def _metrics_logged(self, p: Pending) -> bool:
        history = self.client.get_metric_history(p.run_id, self.first_key)
        return any(m.step == p.step for m in history)

    def _unusable(self, p: Pending, e: Exception) -> str:
        """Tag a checkpoint that cannot be evaluated: corrupt (its files do not verify) or
        skipped (it is not there any more: purged)."""
        if isinstance(e, CheckpointError):
            log.error("checkpoint %s is corrupt, skipping it: %s", p.uri, e)
            self._tag(p, f"corrupt: {e}"[:4900])
            return "corrupt"
        log.warning("checkpoint %s is not there (purged?): %s", p.uri, e)
        self._tag(p, f"skipped: {e}"[:4900])
        return "skipped"

    def report(self, p: Pending, o: Outcome, seconds: float, metrics: bool = True) -> None:
        from mlflow.entities import Metric

        if metrics:
            ts = int(time.time() * 1000)
            self.client.log_batch(p.run_id, metrics=[Metric(k, v, ts, o.step)
                                                     for k, v in o.metrics.items()])  # fmt: skip
        failpoints.kill_if("eval.after_metrics", o.step, 0)  # the metrics are in, the tag not
        for path, png in o.plots.items():
            folder, name = path.rsplit("/", 1)
            self._log_bytes(p.run_id, png, folder, name)
        self._log_results_table(p.run_id)
        self._tag(p, "done")
        log.info("step %d of run %s: %s (%.1f s)", o.step, p.run_id,
                 ", ".join(f"{k.removeprefix('eval/')}={v:.3f}" for k, v in o.metrics.items()
                           if not k.endswith("_random_init")), seconds)  # fmt: skip

    def _tag(self, p: Pending, value: str) -> None:
        self.client.set_tag(p.run_id, DONE_PREFIX + p.tag, value)

    def _log_bytes(self, run_id: str, data: bytes, folder: str, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / name).write_bytes(data)
            self.client.log_artifact(run_id, str(Path(tmp) / name), folder)

    def _log_results_table(self, run_id: str) -> None:
        """`eval/results.parquet`: every eval metric of the run so far, rebuilt from MLflow (the
        source of truth), so harnesses side by side never lose each other's rows."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        run = self.client.get_run(run_id)
        rows = []
        for key in sorted(k for k in run.data.metrics if k.startswith("eval/")):
            _, task, protocol, metric = key.split("/", 3)
            for m in self.client.get_metric_history(run_id, key):
                rows.append({"step": m.step, "task": task, "protocol": protocol,
                             "metric": metric, "value": m.value, "logged_at_ms": m.timestamp})  # fmt: skip
        rows.sort(key=lambda r: (r["step"], r["task"], r["protocol"], r["metric"]))
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), buf)
        self._log_bytes(run_id, buf.getvalue(), "eval", "results.parquet")

    # -- the loop
    def watch(self, target: str, poll_s: float = 30.0, once: bool = False) -> dict[str, int]:
        """Evaluate what is pending, then look again every `poll_s` seconds until `stop` is set
        (or, with `once`, until nothing is pending). Returns counts of outcomes."""
        log.info("harness %s watching %s: tasks %s, %s first, every %.0f s", self.owner, target,
                 ", ".join(s.name for s in self.specs), self.order, poll_s)  # fmt: skip
        counts: dict[str, int] = {}
        waiting = False
        while not self.stop.is_set():
            worked = False
            try:
                runs = self.runs(target)
            except ValueError:
                if once:
                    raise
                if not waiting:  # the harness may start before the training job's first run
                    log.warning("%s is not an experiment or run yet: waiting for it", target)
                waiting, runs = True, []
            for run in runs:
                for p in self.pending(run):
                    if self.stop.is_set():
                        break
                    outcome = self.process(p)
                    counts[outcome] = counts.get(outcome, 0) + 1
                    worked = worked or outcome in ("done", "completed", "corrupt", "skipped")
            if once and not worked:
                break
            if not worked:
                self.stop.wait(poll_s)
        return counts
