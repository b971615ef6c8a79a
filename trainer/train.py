"""`darkmatter pretrain` as a worker: one process per rank under torchrun / deepspeed / srun.

The loop: take `grad_accum` micro-batches from the rank's stream, forward/backward through the
DeepSpeed engine, step; every `log_every` steps reduce the figures across ranks and hand them to
metrics.jsonl and MLflow (rank 0); every `checkpoint.every` steps checkpoint (trainer.checkpoint). Masking randomness is a
function of (seed, step, rank, micro-batch), so it does not depend on where a restart happened.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import logging
import math
import platform
import re
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from darkmatter import startup, storage
from darkmatter.data_pipeline.reader import DataStream, MixtureStream, ReaderOptions
from darkmatter.storage import failpoints
from darkmatter.trainer import checkpoint as ckpt
from darkmatter.trainer import checkpoint_reader as reader
from darkmatter.trainer import checkpoint_writer as ckpt_writer
from darkmatter.trainer import datasets, environment, perf
from darkmatter.trainer import engine as eng
from darkmatter.trainer.config import (
    Config,
    batch_plan,
    deepspeed_config,
    flatten,
    to_dict,
)
from darkmatter.trainer.objectives import Objective
from darkmatter.trainer.preemption import PREEMPTED_EXIT, Preempted, Signals, slurm_requeue
from darkmatter.trainer.preflight import dataset_meta, preflight
from darkmatter.trainer.resume import Position, Resumer, truncate_metrics
from darkmatter.trainer.tracking import Tracker, redact, resolve_uri

log = logging.getLogger("darkmatter.train")


def micro_batch_generator(cfg: Config, step: int, rank: int, micro: int) -> torch.Generator:
    # A pure function of (seed, step, rank, micro): resume-safe without saving generator state.
    return torch.Generator().manual_seed(hash((cfg.train.seed, step, rank, micro)) & (2**62 - 1))


def make_stream(
    cfg: Config, rank: int, world_size: int, meta: dict[str, Any] | None = None
) -> DataStream | MixtureStream:
    """One source: a DataStream of its dataset (state format unchanged); several: a weighted
    MixtureStream. `meta` is dataset_meta(cfg) (resolved here when not given): its sources are
    dataset URLs (raw files already indexed), and for text its tokenizer is what raw text is
    tokenized with on the fly."""
    meta = meta or dataset_meta(cfg)
    d = cfg.data
    opts = ReaderOptions(
        shuffle_buffer=d.shuffle_buffer, strict=d.strict, verify=d.verify,
        max_member_bytes=int(d.max_member_mb * 2**20), readahead=d.readahead,
        range_reads=d.range_reads,
        retry=cfg.storage.retry, cache_dir=d.cache_dir, cache_bytes=int(d.cache_gb * 2**30),
        text=datasets.text_spec(meta),
    )  # fmt: skip
    kw: dict[str, Any] = dict(
        rank=rank, world_size=world_size, micro_batch_size=cfg.train.micro_batch_size,
        grad_accum=batch_plan(cfg, world_size).grad_accum, num_workers=d.num_workers,
        seed=cfg.train.seed,
        partitions=d.partitions, options=opts, allow_growth=d.allow_growth,
    )  # fmt: skip
    sources = meta["sources"]
    if len(sources) == 1:
        return DataStream(sources[0][1], **kw)
    return MixtureStream([tuple(s) for s in sources], **kw)


class Trainer:
    def __init__(self, cfg: Config, objective: Objective, rank: int, world_size: int):
        self.cfg, self.objective, self.rank, self.world_size = cfg, objective, rank, world_size
        self.run_dir = Path(cfg.train.run_dir)
        c = cfg.checkpoint
        self.ckpt_root = c.root or str(self.run_dir / "checkpoints")
        self.staging = Path(c.staging_dir or self.run_dir / "staging")
        self.policy = cfg.storage.retry  # every checkpoint transfer's, as every shard fetch's
        self.ds_config = deepspeed_config(cfg, world_size)
        self.resumer = Resumer(cfg, objective, rank, world_size, self.ckpt_root, self.staging,
                               self.policy)  # fmt: skip
        self.resumer.check_shared_root()
        found = self.resumer.find()  # before the engine: a new world size changes its config
        if found and found.universal:
            self.ds_config["checkpoint"] = {
                **self.ds_config.get("checkpoint", {}),
                "load_universal": True,
            }
        self.engine, self._hf_ds = eng.build_engine(
            cfg, self.ds_config, objective.build_model, objective.lr_scale
        )
        objective.prepare_engine(self.engine)
        self.ckpt_engine = eng.attach_checkpoint_engine(self.engine)
        self.writer = ckpt_writer.Writer(
            self.ckpt_root, self.staging, rank, functools.partial(eng.all_gather, group=eng.side_group()),
            async_save=c.async_save, policy=self.policy, keep_last=c.keep_last,
            keep_every=c.keep_every,
        )  # fmt: skip
        self._assets: dict[str, bytes] = {}  # rank 0: the input files every checkpoint carries
        if rank == 0:
            data = dataclasses.asdict(cfg.data)
            self._assets = ckpt_writer.input_assets(objective.meta, objective.modality, data)
            ckpt_writer.record_root(self.run_dir, self.ckpt_root)
        self.signals = Signals(cfg.faults.signals, cfg.faults.grace_s)
        self.stream = make_stream(cfg, rank, world_size, objective.meta)
        self.pos = self.resumer.load(found, self.engine, self.stream)
        self.nodes = sorted(set(eng.all_gather(platform.node())))
        # MFU's denominator: rank 0 logs (a CPU's peak is measured, which takes a moment).
        if rank == 0:
            self.peak = perf.peak_flops(cfg.tracking.peak_tflops, cfg.train.bf16)
        else:
            self.peak = perf.Peak(0.0, "rank 0 only")
        self.tracker = self._start_tracking() if rank == 0 else None
        self._data_seen = self.stream.summary()  # counters at the last log line
        self._obj_counts: dict[str, float] = {}  # the objective's counts since the last line
        self._stall_s = 0.0  # training time lost to saves since the last log line
        self._norms: collections.deque[float] = collections.deque(maxlen=50)  # applied steps'
        self._skips: list[int] = []  # recently skipped steps
        self._rolled_back_to = -1
        self._last_norm = float("nan")

    def _start_tracking(self) -> Tracker | None:
        t = self.cfg.tracking
        uri = resolve_uri(t.tracking_uri)
        if not (t.enabled and uri):
            return None
        run_name = t.run_name or self.run_dir.name
        tracker = Tracker(uri, t.experiment, run_name, run_id=self.pos.mlflow_run_id,
                          flush_s=t.flush_s, max_buffer=t.max_buffer)  # fmt: skip
        log.info(
            "MLflow run %s: %s", "continued" if tracker.resumed else "created", tracker.run_url
        )
        self.pos.mlflow_run_id = tracker.run_id
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # Atomic: a job killed mid-write would leave a torn file its restart cannot parse.
        run = {"run_id": tracker.run_id, "tracking_uri": uri, "url": tracker.run_url}
        storage.put_atomic(str(self.run_dir), "mlflow_run.json", json.dumps(run).encode())
        mfu = {f"mfu.{k}": v for k, v in self.objective.flops_inputs().items()}
        mfu.update({"mfu.peak_flops": self.peak.flops, "mfu.peak_source": self.peak.source,
                    "mfu.formula": "seq*(6*matmul_params + 12*layers*heads*head_dim*seq)"})  # fmt: skip
        tracker.log_params({**flatten(to_dict(self.cfg)), **mfu})
        tracker.set_tags(self._tags())
        cfg_text = yaml.safe_dump(redact(to_dict(self.cfg)), sort_keys=False)
        tracker.log_text(cfg_text, "config.yaml")
        tracker.log_dict(self.ds_config, "deepspeed_config.json")
        tracker.log_dict(environment.summary(self.nodes, self.world_size), "environment.json")
        if tracker.resumed:
            tracker.backfill = functools.partial(self._unsent_rows, self.pos.step)
        return tracker

    def _unsent_rows(self, upto: int, have: set[int]) -> list[tuple[int, dict[str, float]]]:
        """Rows of metrics.jsonl up to the resumed step that the MLflow run lacks: the dead
        job's, still queued when it died or logged during an outage."""
        path, rows = self.run_dir / "metrics.jsonl", []
        for line in path.read_text().splitlines() if path.is_file() else []:
            try:
                rec = json.loads(line)
            except ValueError:  # the line this job is appending right now
                continue
            if rec["step"] <= upto and rec["step"] not in have:
                rows.append((rec["step"], {k: v for k, v in rec.items() if k != "step"}))
        return rows

    def _tags(self) -> dict[str, Any]:
        import deepspeed
        import transformers

        n_params = sum(p.numel() for p in self.engine.module.parameters())
        if self.cfg.train.zero_stage == 3:  # partitioned: count the full shapes
            n_params = sum(
                getattr(p, "ds_numel", p.numel()) for p in self.engine.module.parameters()
            )
        sha, dirty = environment.git_revision()
        return {
            "objective": self.cfg.objective, "world_size": self.world_size,
            "nodes": ",".join(self.nodes), "num_nodes": len(self.nodes),
            "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__, "git_sha": sha, "git_dirty": dirty,
            "parameters": n_params, "restarts": self.pos.restarts,
        }  # fmt: skip

    # -- the loop -------------------------------------------------------------------------
    def train(self) -> Position:
        t = self.cfg.train
        every = self.cfg.checkpoint.every
        window = _Window()
        eng.install_step_gate(self.engine, self._skip_guard)
        while self.pos.step < t.steps:
            t0 = time.perf_counter()
            loss, tokens, flops, phases, applied = self._step()
            self.pos.step += 1
            if applied:
                self.objective.after_step(self.engine, self.pos.step)
            window.add(loss, tokens, flops, time.perf_counter() - t0, phases, applied)
            failpoints.kill_if("train.step", self.pos.step, self.rank)
            if not applied and self._skipped(self.pos.step):  # rolled back: the window restarts
                window = _Window()
                continue
            preempted = eng.any_rank(self.signals.received is not None)
            if self.pos.step % every == 0 or self.pos.step == t.steps or preempted:
                self.save(wait=preempted or self.pos.step == t.steps)
            if self.pos.step % t.log_every == 0 or self.pos.step == t.steps or preempted:
                self._log(window)
                window = _Window()
            failpoints.pause_if("train.pause", self.pos.step, self.rank)
            if preempted:
                raise Preempted(self.signals.received or "a signal on another rank")
        if self.tracker:
            self.tracker.finish("FINISHED")
        return self.pos

    def _step(self) -> tuple[float, int, float, dict[str, float], bool]:
        """One optimizer step: (mean loss, tokens, model FLOPs, seconds per phase, whether the
        update was applied)."""
        losses, tokens, flops = [], 0, 0.0
        timer = perf.PhaseTimer()
        timer.mark("start")
        micro_batches = self.stream.next_step()
        timer.mark("data")
        self.pos.epoch = self.stream.epoch
        for micro, samples in enumerate(micro_batches):
            gen = micro_batch_generator(self.cfg, self.pos.step, self.rank, micro)
            batch = self.objective.make_batch(samples, gen)
            tokens += self.objective.tokens(batch)
            flops += self.objective.flops(batch)
            for k, v in self.objective.counts(batch).items():  # before to_device drops them
                self._obj_counts[k] = self._obj_counts.get(k, 0.0) + v
            batch = self.objective.to_device(batch, self.engine.device, self.cfg.train.bf16)
            timer.mark("batch")
            out = self.engine(**batch)
            loss = out.loss
            timer.mark("forward")
            if failpoints.hit("train.nan_loss", self.pos.step + 1, self.rank):
                loss = loss * float("nan")
            if failpoints.hit("train.loss_spike", self.pos.step + 1, self.rank):
                loss = loss * 1e4
            self.engine.backward(loss)
            timer.mark("backward")
            self.engine.step()
            timer.mark("optimizer")
            losses.append(loss.item())
        applied = self.engine.was_step_applied()
        return sum(losses) / len(losses), tokens, flops, timer.read(), applied

    def _skip_guard(self, norm: float) -> bool:
        """Veto the update of this step? The same answer on every rank: the norm is global."""
        self._last_norm = norm
        if not math.isfinite(norm):
            return True
        spike = self.cfg.faults.grad_norm_spike
        if spike and len(self._norms) >= 5 and norm > spike * (sum(self._norms) / len(self._norms)):
            return True
        self._norms.append(norm)
        return False

    def _skipped(self, step: int) -> bool:
        """Count a skipped step; too many in the window roll back to the last checkpoint
        (returns whether it did)."""
        f = self.cfg.faults
        self.pos.skipped_steps += 1
        self._skips = [s for s in self._skips if s > step - f.skip_window] + [step]
        if self.rank == 0:
            log.warning("step %d skipped on every rank: its gradient was not finite or spiked "
                        "(%d in the last %d steps)", step, len(self._skips), f.skip_window)  # fmt: skip
        if len(self._skips) < f.max_skips:
            return False
        self._rollback()
        return True

    def _rollback(self) -> None:
        """Back to the last committed checkpoint's model, optimizer and RNG state; the data
        stream keeps its position, so the samples of the bad window are not seen again."""
        self.writer.wait()
        tags = ckpt.committed_tags(self.ckpt_root) if self.rank == 0 else []
        tags = eng.all_gather(tags)[0]
        if not tags:
            raise RuntimeError(
                f"{len(self._skips)} skipped steps in {self.cfg.faults.skip_window} and no "
                f"checkpoint in {self.ckpt_root} to roll back to: training diverges"
            )
        folder, tag, _ = self.resumer.fetch_newest_usable(self.ckpt_root, tags)
        to_step = ckpt.step_of(tag)
        if to_step == self._rolled_back_to:
            raise RuntimeError(
                f"steps keep failing after rolling back to step {to_step} with fresh data: "
                "training diverges (lower train.lr or raise faults.grad_norm_spike)"
            )
        eng.load_checkpoint(self.engine, str(folder), tag)
        ckpt.read_rank_state(folder / tag, self.rank)  # the RNG state
        if self.rank == 0:
            log.warning("rolling back from step %d to step %d; the data stream moves on",
                        self.pos.step, to_step)  # fmt: skip
            truncate_metrics(self.run_dir / "metrics.jsonl", to_step)
            if self.tracker:
                self.tracker.redone_steps_differ()  # the data moves on: new values, logged
                self.tracker.set_tags({"nan_rollback": str(self.pos.rollbacks + 1)})
        self.pos.step, self._rolled_back_to = to_step, to_step
        self.pos.rollbacks += 1
        self._skips = []

    def _log(self, w: _Window) -> None:
        """Reduce the window's figures across ranks (the one collective of a log interval) and
        hand them to metrics.jsonl and, on rank 0, MLflow."""
        plan = batch_plan(self.cfg, self.world_size)
        data = self.stream.summary()
        delta = {k: v - self._data_seen.get(k, 0) for k, v in data.items()}
        self._data_seen = data
        self._write_quarantine()
        means = dict(zip(_REDUCED, eng.all_reduce_mean([
            w.mean_loss, w.tokens, w.flops, w.seconds, *(w.phases.get(p, 0.0) for p in PHASES),
            delta["bytes_read"] / 2**20, delta["retries"], delta["skipped"],
        ]), strict=True))  # fmt: skip
        mem_max, neg_min = eng.all_reduce_max([perf.memory_gb(), -perf.memory_gb()])
        # Totals of the whole job (data counters) and of the window (the objective's).
        counts = _sum_counts(eng.all_gather({**_counts(data), **self._obj_counts}))
        self._obj_counts = {}
        gnorm = self.engine.get_global_grad_norm()
        if gnorm is None:  # without ZeRO DeepSpeed keeps no norm; the step gate saw it
            gnorm = self._last_norm
        secs, n = means["seconds"], w.steps
        rec = {
            "step": self.pos.step, "epoch": self.pos.epoch, "loss": means["loss"],
            "lr": self.engine.get_lr()[0],
            "grad_norm": float(gnorm) if gnorm is not None else float("nan"),
            "samples_per_s": plan.global_batch_size * n / secs,
            # Means over ranks; the fraction is what the slowest-fed rank would show on average.
            "data_wait_s": means["data"] / n, "data_wait_fraction": means["data"] / secs,
            "data_mb_per_s": means["mb"] * self.world_size / secs,
            "data_retries": means["retries"] * self.world_size,
            "data_skipped": means["skipped"] * self.world_size,
            "skipped_steps": self.pos.skipped_steps, "rollbacks": self.pos.rollbacks,
            # Where a step's time goes, per step, means over ranks.
            "time/step_s": secs / n,
            **{f"time/{p}_s": means[p] / n for p in PHASES},
            "time/other_s": max(0.0, secs - sum(means[p] for p in PHASES)) / n,
            "memory/max_gb": mem_max, "memory/min_gb": -neg_min,  # peak so far, per rank
        }  # fmt: skip
        rec.update({k if k.startswith("data/") else f"data/{k}": v for k, v in counts.items()})
        if counts.get("data/pack/slots"):
            rec["data/pack/efficiency"] = counts["data/pack/tokens"] / counts["data/pack/slots"]
        if self.objective.modality == "text":
            rec["tokens_per_s"] = means["tokens"] * self.world_size / secs
        rec["model_tflops_per_s"] = means["flops"] / secs / 1e12  # per device
        if self.rank != 0:
            return
        if self.peak.flops > 0:
            rec["mfu"] = means["flops"] / secs / self.peak.flops
        rec["checkpoint/stall_s"], self._stall_s = self._stall_s, 0.0
        for report in self.writer.drain():  # saves finished since the last line (rank 0's part)
            rec.update({
                "checkpoint/step": report.step, "checkpoint/write_s": report.write_s,
                "checkpoint/upload_s": report.upload_s, "checkpoint/mb": report.bytes / 2**20,
                "checkpoint/committed": float(report.committed),
                "checkpoint/failed_in_a_row": float(self.writer.failed_in_a_row),
            })  # fmt: skip
            if self.tracker and report.error:
                self.tracker.set_tags({"checkpoint.last_error": report.error[:4000]})
            if self.tracker and report.index is not None:
                self._publish_index(report.index)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        log.info(
            " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items())
        )
        if self.tracker:
            self.tracker.log_metrics(self.pos.step, {k: v for k, v in rec.items() if k != "step"})

    def _publish_index(self, index: list[dict[str, Any]]) -> None:
        """The committed checkpoints (step → URI, commit time) as the run's
        `checkpoints/index.json`: what the evaluation harness watches."""
        assert self.tracker is not None
        self.tracker.log_dict({"root": self.ckpt_root, "checkpoints": index},
                              "checkpoints/index.json")  # fmt: skip
        if index:
            self.tracker.set_tags({"checkpoint.latest": index[-1]["uri"],
                                   "checkpoint.latest_step": index[-1]["step"]})  # fmt: skip

    def save(self, wait: bool = False) -> None:
        """Checkpoint this step. The training thread only takes the snapshot; writing, upload
        and commit run in the background unless `wait` (preemption, the last step) or
        checkpoint.async_save is off."""
        t0 = time.perf_counter()
        tag = ckpt.tag_for(self.pos.step)
        self.writer.wait()  # the previous save's upload and commit: its outcome, on every rank
        self._check_saves()
        job = self.writer.begin(tag)
        folder = self.writer.local_root / tag
        self.ckpt_engine.sink = lambda path, sd: job.add_torch(
            str(Path(path).relative_to(folder)), sd
        )
        eng.save_checkpoint(self.engine, str(self.writer.local_root), tag, {"step": self.pos.step})
        if self.cfg.checkpoint.module_weights and self.engine.zero_optimization_stage() == 3:
            weights = eng.gathered_module_weights(self.engine)  # a collective: every rank
            if weights is not None:
                job.add_torch(reader.MODULE_WEIGHTS, weights, owned=True)
        ckpt_writer.rank_state(job, self.rank, self._rank_state())
        if self.rank == 0:
            job.add_bytes(
                "model_config.json", self.objective.model_config().to_json_string().encode()
            )
            ckpt_writer.add_assets(job, self._model_meta(), self._assets)
            for script in sorted(folder.glob("*.py")):  # DeepSpeed's zero_to_fp32.py & co.
                job.add_file(script.name)
        self.writer.submit(job)
        if wait:
            self.writer.wait()
            if self.writer.failed_in_a_row:  # the last save of the job (or of a preemption)
                raise ckpt.CheckpointError(f"{self.writer.last_error}: stopping with no "
                                           "checkpoint of this step")  # fmt: skip
        self._stall_s += time.perf_counter() - t0

    def _check_saves(self) -> None:
        """Stop, on every rank alike, after checkpoint.max_failed_saves saves in a row were not
        committed: training on for hours with no checkpoint only loses more work."""
        limit, failed = self.cfg.checkpoint.max_failed_saves, self.writer.failed_in_a_row
        if failed and failed >= limit:
            raise ckpt.CheckpointError(
                f"{failed} checkpoint saves in a row failed (checkpoint.max_failed_saves="
                f"{limit}); last: {self.writer.last_error}"
            )

    def _rank_state(self) -> dict[str, Any]:
        p = self.pos
        return {
            "step": p.step, "epoch": p.epoch, "mlflow_run_id": p.mlflow_run_id,
            "restarts": p.restarts, "world_size": self.world_size, "seed": self.cfg.train.seed,
            "skipped_steps": p.skipped_steps, "rollbacks": p.rollbacks,
            "data": self.stream.state_dict(),
        }  # fmt: skip

    def _write_quarantine(self) -> None:
        """Rank 0 appends every rank's newly skipped samples to RUN_DIR/quarantine.jsonl and
        sends them, and only them, to MLflow as one part object per log interval."""
        holes, unlogged = self.stream.quarantine.take_new()
        new = [h._asdict() for h in holes]
        if unlogged:  # more holes in one interval than the reader keeps: say how many
            new.append({"unlogged": unlogged})
        gathered = eng.gather_to_rank0(new)
        if gathered is None or not any(gathered):
            return
        lines = []
        for rank, entries in enumerate(gathered):
            for entry in entries:
                lines.append(json.dumps({"step": self.pos.step, "rank": rank, **entry}) + "\n")
                if "unlogged" in entry:
                    log.warning("rank %d: %d skipped samples not logged", rank, entry["unlogged"])
                else:
                    log.warning(
                        "skipped bad data: shard %(shard)s, sample %(key)s: %(reason)s", entry
                    )
        chunk = "".join(lines)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "quarantine.jsonl", "a") as f:
            f.write(chunk)
        if self.tracker:
            # Only this interval's entries: the upload costs what is new, never the whole log.
            # Named by step, so an interval redone after a resume replaces its own part.
            self.tracker.log_text(chunk, f"data/quarantine/part-{self.pos.step:08d}.jsonl")

    def _model_meta(self) -> dict[str, Any]:
        return {
            "objective": self.cfg.objective, "step": self.pos.step,
            "zero_stage": self.cfg.train.zero_stage,
            "dataset": self.cfg.data.url or [url for _, url, _ in self.objective.meta["sources"]],
            "tokenizer": self.objective.meta.get("tokenizer_url"),
            "mlflow_run_id": self.pos.mlflow_run_id,
            "modality": self.objective.modality,
            # What the harness and export need to make inputs as training did (url aside).
            "data": {k: v for k, v in dataclasses.asdict(self.cfg.data).items() if k != "url"},
        }  # fmt: skip


def _counts(summary: dict[str, float]) -> dict[str, float]:
    """A rank's cumulative counters that go to MLflow by name: samples per source, bad samples
    by reason (the keys differ between ranks, so they travel as a dict, not a reduced vector)."""
    return {k: v for k, v in summary.items() if k.startswith(("source/", "skipped/"))}


def _sum_counts(per_rank: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for counts in per_rank:
        for k, v in counts.items():
            # An epoch or a source's consumed samples is a position (the same on every rank).
            position = k.endswith(("/epoch", "/consumed"))
            out[k] = max(out.get(k, 0), v) if position else out.get(k, 0) + v
    return out


PHASES = ("data", "batch", "forward", "backward", "optimizer")  # of a step, in order
_REDUCED = ("loss", "tokens", "flops", "seconds", *PHASES, "mb", "retries", "skipped")


@dataclass
class _Window:
    """Sums over the steps since the last log line."""

    steps: int = 0
    applied: int = 0  # steps whose update was applied: the loss is averaged over these
    loss_sum: float = 0.0
    tokens: int = 0
    flops: float = 0.0
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)

    def add(
        self, loss: float, tokens: int, flops: float, seconds: float, phases: dict[str, float],
        applied: bool,
    ) -> None:  # fmt: skip
        self.steps += 1
        if applied:
            self.applied += 1
            self.loss_sum += loss
        self.tokens += tokens
        self.flops += flops
        self.seconds += seconds
        for k, v in phases.items():
            self.phases[k] = self.phases.get(k, 0.0) + v

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.applied if self.applied else float("nan")


def oom_note(e: BaseException, rank: int, step: int | None) -> str:
    """The line an out-of-memory error of training is reported with (darkmatter.cli prints it):
    where it struck (rank, step), the memory figures, and what to change."""
    where = f"step {step}" if step is not None else "building the engine"
    asked = re.search(r"Tried to allocate ([0-9.]+ [KMGT]i?B)", str(e))  # torch's CUDA message
    request = f"; tried to allocate {asked.group(1)}" if asked else ""
    return (
        f"out of memory on rank {rank} at {where}: {_memory_figures()}{request}; lower "
        "train.micro_batch_size (raise train.grad_accum to keep the global batch), or set "
        "train.activation_checkpointing=true or a higher train.zero_stage"
    )


def _memory_figures() -> str:
    if not torch.cuda.is_available():  # torch's CPU allocator keeps no figures: the OS's peak
        return f"peak resident memory {perf.memory_gb():.1f} GiB, no CUDA device"
    dev = torch.cuda.current_device()
    gib = [n / 2**30 for n in (torch.cuda.memory_allocated(dev),
                               torch.cuda.max_memory_allocated(dev),
                               torch.cuda.memory_reserved(dev),
                               torch.cuda.get_device_properties(dev).total_memory)]  # fmt: skip
    return (f"{gib[0]:.2f} GiB allocated (peak {gib[1]:.2f} GiB), {gib[2]:.2f} GiB reserved, "
            f"of {gib[3]:.2f} GiB on cuda:{dev}")  # fmt: skip


@contextlib.contextmanager
def noting_oom(rank: int, step: Callable[[], int | None]) -> Iterator[None]:
    """An out-of-memory error raised inside gets oom_note as a note: the rank, `step()` and
    the memory figures travel with it to whatever reports it."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        e.add_note(oom_note(e, rank, step()))
        raise


def run_worker(cfg: Config) -> int:
    """Entry point of one rank."""
    eng.use_deterministic_algorithms(cfg.train.deterministic)
    objective = preflight(cfg)
    rank, world_size, _ = eng.init_distributed(cfg.faults.collective_timeout_s)
    with noting_oom(rank, lambda: None):
        trainer = Trainer(cfg, objective, rank, world_size)
    startup.settle()  # the training loop's collections leave the startup heap alone
    try:
        with noting_oom(rank, lambda: trainer.pos.step + 1):  # the step being taken
            pos = trainer.train()
    except Preempted as p:
        if trainer.tracker:
            trainer.tracker.set_tags({"preempted": "true", "preempt_signal": p.signal_name})
            trainer.tracker.finish("KILLED")
        log.warning("%s: checkpoint at step %d committed, exiting", p, trainer.pos.step)
        if rank == 0 and cfg.faults.requeue:
            slurm_requeue()
        trainer.stream.close()
        eng.shutdown()
        return PREEMPTED_EXIT
    except BaseException as e:
        if trainer.tracker:
            trainer.tracker.set_tags({"crashed": "true", "error": str(e)[:4000]})
            # The evidence stays with the run, whatever becomes of the machine's files.
            trainer.tracker.log_text(
                redact("".join(traceback.format_exception(e))), "crash/rank0.log"
            )
            trainer.tracker.finish("FAILED")
        trainer.stream.close()
        # Release the process group here: left to interpreter exit, gloo's threads can be torn
        # down mid-flight, and the C++ runtime aborts (exit -6) over the error line.
        try:
            eng.shutdown()
        except Exception as e:  # the error being raised is the one to report
            log.debug("process group shutdown after an error failed: %s", e)
        raise
    finally:
        trainer.stream.close()  # stop the data workers now, not at interpreter exit
    if rank == 0:
        print(json.dumps({"event": "done", "step": pos.step, "run_dir": str(trainer.run_dir),
                          "mlflow_run_id": pos.mlflow_run_id}))  # fmt: skip
    eng.shutdown(together=True)
    return 0
