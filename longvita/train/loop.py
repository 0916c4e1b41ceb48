"""The training loop of one stage, on every rank of a job (one process, or dp x cp ranks).

Owns the order of things, each a named step:
  `prepare_run`    the run directory: a new run, or the latest complete checkpoint to resume;
  `build_model`    weights (the stage's `init:`, or the run's own config when resuming),
                   frozen parts, device, activation checkpointing and FSDP2 (`parallel.fsdp`);
  `build_loader`   the packed-sequence loader of this rank's data-parallel share;
  `train_step`     one optimizer step: the step's sequences, the loss normalized by the
                   supervised tokens of the whole step over every rank, backward, clipping,
                   the update or, when the loss or gradient is not finite, a counted skip;
  `run_training`   the loop: checkpoints every `checkpoint.interval` steps, at the end and on
                   SIGTERM/SIGINT (preemption), metrics, resume.
Knows nothing of processes starting (`train.cli`, `parallel.launch`) or of file formats
(`train.run_dir`, `parallel.dcp`).
"""

from __future__ import annotations

import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from longvita.data.config import DataConfig
from longvita.data.loader import PackedLoader
from longvita.data.mixture import Mixture
from longvita.data.packed import PackedSequence
from longvita.errors import RunError
from longvita.model.long_vita import LongVITAForCausalLM
from longvita.ops.loss import IGNORE_INDEX
from longvita.parallel import dcp
from longvita.parallel.collectives import any_rank, sum_over
from longvita.parallel.context_parallel import sequence_loss
from longvita.parallel.fsdp import clip_gradients, parallelize
from longvita.parallel.state import ParallelState
from longvita.processing.processor import Processor
from longvita.processing.tokens import save_tokenizer
from longvita.train.config import StageConfig
from longvita.train.init import InitSpec, initialize
from longvita.train.metrics import MetricsLog, StepRecord, plot_curves, read_metrics
from longvita.train.optim import build_optimizer, build_scheduler, freeze, param_groups
from longvita.train.run_dir import RunDirectory, RunDirError

logger = logging.getLogger(__name__)


class NonFiniteError(RunError):
    """Too many steps in a row with a loss or gradient that is not finite."""


@dataclass
class TrainResult:
    """How a stage's run ended (returned by global rank 0)."""

    run_dir: str
    step: int
    """Optimizer steps done."""
    stopped: bool
    """True when a signal stopped the run before its last step (a checkpoint was written)."""
    checkpoint: str | None
    skipped_steps: int = 0
    final_loss: float | None = None
    skipped_samples: dict[str, int] = field(default_factory=dict)


@dataclass
class StepOutcome:
    loss: float
    grad_norm: float
    tokens: int
    supervised_tokens: int
    applied: bool


def world_of(state: ParallelState) -> dict[str, int]:
    return {"world_size": state.world_size, "dp": state.dp_size, "cp": state.cp_size}


def prepare_run(stage: StageConfig, run: RunDirectory, state: ParallelState) -> Path | None:
    """The checkpoint to resume from (None for a new run, whose manifest is written now)."""
    resume = run.latest_checkpoint()
    if resume is not None:
        run.check_resumable(stage, world_of(state))
        logger.info("resuming %s from %s", run.path, resume.name)
    elif state.is_main:
        run.create(stage, world_of(state))
    dcp.barrier(state)
    return resume


def build_model(
    stage: StageConfig, run: RunDirectory, state: ParallelState, *, resuming: bool
) -> tuple[LongVITAForCausalLM, object]:
    """The model ready to train on `state.device`, and its tokenizer."""
    if resuming:  # the weights come from the checkpoint: skip reading the init weights
        spec = InitSpec(model=str(run.model_dir / "config.json"), tokenizer=str(run.model_dir))
    else:
        spec = InitSpec.from_dict(stage.init)
    model, tokenizer = initialize(spec, seed=stage.seed)
    if state.is_main and not resuming:
        run.model_dir.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(run.model_dir)
        save_tokenizer(tokenizer, run.model_dir)
    counts = freeze(model, stage.trainable)
    logger.info("trainable parameters: %s", counts)
    model.to(state.device).train()
    return parallelize(
        model,
        state,
        activation_checkpointing=stage.parallel.activation_checkpointing,
        vision_trains=stage.trainable.vision,
    ), tokenizer


def build_loader(stage: StageConfig, processor: Processor, state: ParallelState) -> PackedLoader:
    """This data-parallel rank's loader (the cp ranks of a dp group read the same sequences)."""
    data = stage.data
    root = stage.resolve(data.data_root) if data.data_root else None
    mixture = Mixture.from_yaml(stage.resolve(data.mixture), data_root=root, seed=data.seed)
    config = DataConfig(
        seq_len=data.seq_len,
        packing=data.packing,
        num_bins=data.num_bins,
        reset_per_sample=data.reset_per_sample,
        pose_max_position=data.pose_max_position,
        max_frames=data.max_frames,
        fps=data.fps,
        num_workers=data.num_workers,
    )
    return PackedLoader(mixture, processor, config, dp_rank=state.dp_rank, dp_size=state.dp_size)


def train_step(
    model: LongVITAForCausalLM,
    batch: list[PackedSequence],
    state: ParallelState,
    stage: StageConfig,
    *,
    pad_id: int,
    optimizer: torch.optim.Optimizer,
    scheduler,
    params: list[torch.nn.Parameter],
) -> StepOutcome:
    """One optimizer step over this rank's `batch`; the same outcome on every rank."""
    local = [sum(int((seq.targets != IGNORE_INDEX).sum()) for seq in batch),
             sum(int((seq.input_ids != pad_id).sum()) for seq in batch)]  # fmt: skip
    supervised, tokens = (int(v) for v in sum_over(local, state, group="dp"))
    loss_sum = 0.0
    for seq in batch:
        result = sequence_loss(
            model,
            seq,
            state,
            pad_id=pad_id,
            chunk_size=stage.loss.chunk_size,
            normalizer=max(supervised, 1),
            logits_masked=stage.loss.logits_masked,
            keep_vision_in_graph=True,  # as the official code: see embed_multimodal
        )
        result.loss.backward()
        loss_sum += float(result.total)
    (total,) = sum_over([loss_sum], state, group="dp")  # every cp rank holds the whole total
    loss = total / max(supervised, 1)
    grad_norm = clip_gradients(params, stage.optim.clip)
    applied = math.isfinite(loss) and math.isfinite(grad_norm)
    if applied:
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepOutcome(loss, grad_norm, tokens, supervised, applied)


class StopRequest:
    """SIGTERM (preemption) or SIGINT asks the loop to checkpoint and stop after the step in
    progress; a second SIGINT stops at once (KeyboardInterrupt), except while a checkpoint is
    being written (`saving`): that one finishes first, as a half-written one is never used."""

    def __init__(self, *, announce: bool = True) -> None:
        self.requested = False
        self.saving = False
        self.announce = announce
        """Whether this process says what a signal does (global rank 0: once for the job)."""
        self._previous = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            if signal.getsignal(sig) is signal.SIG_IGN:
                continue  # a spawned rank: its parent forwards SIGTERM
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            if self.saving:
                if self.announce:
                    logger.warning("Ctrl-C: the checkpoint being written finishes first")
                return
            raise KeyboardInterrupt
        self.requested = True
        if self.announce:
            how = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            logger.warning("%s: checkpointing after this step, then stopping", how)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def run_training(state: ParallelState, stage: StageConfig, run_dir: str) -> TrainResult | None:
    """Train `stage` into `run_dir` on every rank of `state`; global rank 0 returns how it
    ended. Resumes from the latest complete checkpoint of `run_dir` when there is one."""
    torch.manual_seed(stage.seed)
    # from the start: a SIGTERM while the ranks set up stops after the first step, where
    # the ranks agree on it (before, a rank not yet in the loop died of it)
    with StopRequest(announce=state.is_main) as stop:
        run = RunDirectory(run_dir)
        resume = prepare_run(stage, run, state)
        model, tokenizer = build_model(stage, run, state, resuming=resume is not None)
        processor = Processor(tokenizer, model.config.vision)
        loader = build_loader(stage, processor, state)
        optimizer = build_optimizer(param_groups(model, stage.optim), stage.optim)
        scheduler = build_scheduler(optimizer, stage.optim, stage.schedule)
        counters = {"step": 0, "skipped_steps": 0}
        states = dcp.checkpoint_states(
            dcp.TrainingState(model, optimizer, scheduler, counters), state, loader
        )
        if resume is not None:
            dcp.load(resume, states, state)
            if counters["step"] > stage.schedule.steps:
                raise RunDirError(
                    f"{run.path} is at step {counters['step']}, past schedule.steps="
                    f"{stage.schedule.steps}: give at least {counters['step']}, or a new --out"
                )
            if counters["step"] == stage.schedule.steps and state.is_main:
                logger.warning("%s already reached schedule.steps=%d: nothing to train", run.path,
                               stage.schedule.steps)  # fmt: skip
        loop = _Loop(stage, run, state, model, loader, optimizer, scheduler, counters, states)
        return loop.run(pad_id=processor.tokens.pad, resumed_from=resume, stop=stop)


class _Loop:
    """The steps of `run_training` after set-up, with their checkpoints and metrics."""

    def __init__(self, stage, run, state, model, loader, optimizer, scheduler, counters, states):
        self.stage, self.run_dir, self.state, self.model = stage, run, state, model
        self.loader, self.optimizer, self.scheduler = loader, optimizer, scheduler
        self.counters, self.states = counters, states
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.accumulation = stage.accumulation_steps(state.dp_size)
        self.metrics: MetricsLog | None = None  # global rank 0's, while `run` runs

    def run(
        self, *, pad_id: int, resumed_from: Path | None, stop: StopRequest
    ) -> TrainResult | None:
        self.pad_id = pad_id
        stage, state, counters = self.stage, self.state, self.counters
        metrics = None
        if state.is_main:
            metrics = MetricsLog(
                self.run_dir.metrics_file,
                total_steps=stage.schedule.steps,
                start_step=counters["step"],
                interval=stage.log.interval,
                tensorboard=stage.log.tensorboard,
            )
            if counters["step"] < stage.schedule.steps:
                metrics.note(self._plan(resumed_from))
        self.metrics = metrics
        sequences = iter(self.loader)
        in_a_row, stopped, checkpoint, last_loss = 0, False, resumed_from, None
        try:
            while counters["step"] < stage.schedule.steps:
                record = self._one_step(sequences)
                in_a_row = 0 if not record.skipped else in_a_row + 1
                last_loss = record.loss if not record.skipped else last_loss
                if metrics is not None:
                    metrics.record(record)
                if in_a_row >= stage.optim.max_nonfinite_steps:
                    raise NonFiniteError(
                        f"{in_a_row} steps in a row had a loss or gradient that is not "
                        f"finite (optim.max_nonfinite_steps={stage.optim.max_nonfinite_steps})"
                        f"; the last complete checkpoint is kept: lower optim.lr or check "
                        f"the data"
                    )
                done = counters["step"] == stage.schedule.steps
                stopped = any_rank(stop.requested, state) and not done
                if record.skipped and not stopped:
                    continue
                if stopped or done or counters["step"] % stage.checkpoint.interval == 0:
                    stop.saving = True
                    checkpoint = self._checkpoint()
                    stop.saving = False
                if stopped:
                    break
        finally:
            sequences.close()  # the loader's worker processes end now, not at interpreter exit
            if metrics is not None:
                metrics.close()
        return self._finish(stopped, checkpoint, last_loss)

    def _plan(self, resumed_from: Path | None) -> str:
        """The run's start, in one line: what it trains, from where, how."""
        stage, state, step = self.stage, self.state, self.counters["step"]
        origin = f"resuming from {resumed_from.name}" if resumed_from else "a new run"
        return (
            f"{self.run_dir.path}: steps {step + 1}-{stage.schedule.steps} ({origin}); "
            f"{stage.batch.global_sequences} sequences of {stage.data.seq_len} tokens a step "
            f"(dp {state.dp_size} x cp {state.cp_size}, {self.accumulation} micro-batches of "
            f"{stage.batch.micro} per dp rank); a checkpoint every "
            f"{stage.checkpoint.interval} steps"
        )

    def _one_step(self, sequences) -> StepRecord:
        start = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]  # this step's (the scheduler moves on)
        batch = [next(sequences) for _ in range(self.accumulation)]
        outcome = train_step(
            self.model,
            batch,
            self.state,
            self.stage,
            pad_id=self.pad_id,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            params=self.params,
        )
        if outcome.applied:
            self.counters["step"] += 1
        else:
            self.counters["skipped_steps"] += 1
            logger.warning("step %d skipped: loss %s, grad norm %s", self.counters["step"] + 1,
                           outcome.loss, outcome.grad_norm)  # fmt: skip
        seconds = time.perf_counter() - start
        return StepRecord(
            step=self.counters["step"] + (0 if outcome.applied else 1),
            loss=outcome.loss,
            lr=lr,
            grad_norm=outcome.grad_norm,
            tokens=outcome.tokens,
            supervised_tokens=outcome.supervised_tokens,
            tokens_per_s=outcome.tokens / seconds if seconds > 0 else 0.0,
            seconds=seconds,
            skipped=not outcome.applied,
        )

    def _checkpoint(self) -> Path:
        path = dcp.save(self.run_dir.step_dir(self.counters["step"]), self.states, self.state)
        if self.metrics is not None:
            self.run_dir.keep_latest(self.stage.checkpoint.keep_latest)
            self.metrics.note(f"checkpoint {path}")
        return path

    def _finish(self, stopped: bool, checkpoint: Path | None, loss: float | None):
        skipped = _skipped_samples(self.loader, self.state)
        if not self.state.is_main:
            return None
        records = read_metrics(self.run_dir.metrics_file)
        applied = [r["loss"] for r in records if not r.get("skipped")]
        if loss is None and applied:  # no step ran here (resumed at the end): the run's last
            loss = applied[-1]
        title = f"stage {self.stage.stage or ''} {self.run_dir.path.name}".strip()
        plot_curves(records, self.run_dir.path / "loss.png", title=title)
        return TrainResult(
            run_dir=str(self.run_dir.path),
            step=self.counters["step"],
            stopped=stopped,
            checkpoint=None if checkpoint is None else str(checkpoint),
            skipped_steps=self.counters["skipped_steps"],
            final_loss=loss,
            skipped_samples=skipped,
        )


def _skipped_samples(loader: PackedLoader, state: ParallelState) -> dict[str, int]:
    """Samples skipped by reason so far, over every data-parallel rank."""
    from longvita.data.stats import SKIP_REASONS

    seen = loader.stats_so_far()
    totals = sum_over([float(seen.skipped[r]) for r in SKIP_REASONS], state, group="dp")
    return {r: int(n) for r, n in zip(SKIP_REASONS, totals, strict=True) if n}
