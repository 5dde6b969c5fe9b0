"""The training loop: the official recipe, resumable, observable, on one or several processes.

A run lives in one folder (default ``DATASET/results/PRESET_foldF``)::

    train_config.json      the TrainConfig, plans.json  the plans it trained with
    log.txt                everything printed, progress.csv  one row per epoch
    progress.png           loss and pseudo-Dice curves
    checkpoint_latest.pt   after every epoch, every ``checkpoint_every_min`` inside one, and on SIGTERM
    checkpoint_best.pt     best EMA pseudo-Dice  checkpoint_final.pt  after the last epoch (these two
                           hold what prediction needs, no optimizer state)
    validation/            full-case predictions + summary.json

Progress: a line (iteration, loss, it/s, ETA) at least every ``log_every_s`` seconds in
``log.txt`` and on stdout, whatever the epoch length; a tqdm bar only on a terminal.

Exact resume: every batch of patches is drawn from ``(seed, epoch, rank, batch index)`` whichever
worker draws it, dropout is seeded from ``(seed, rank, epoch)``, and the checkpoint holds the
model, optimizer, scaler, epoch, iteration, EMA, history, RNG states and the kernels chosen by
timing (``kernels.WEIGHT_GRAD_CHOICES``, restored before the first step); a run killed at any point
and resumed from ``checkpoint_latest.pt`` continues exactly as it would have run (with a time
budget the learning rate follows the clock, so there only the draws repeat exactly).

Budget: with ``time_budget_min`` the whole job (start-up, training, validation) fits the budget;
:mod:`unetrpp.training.budget` plans the network, the recipe and the final validation for it.

Multi-process: under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in
DistributedDataParallel (NCCL on CUDA, gloo on CPU), the batch is split over the processes, each
draws its own patches, validation counts are summed, and rank 0 alone writes files.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import signal
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..checkpoint import Checkpoint, TrainingState, save_checkpoint
from ..data.layout import Dataset, load_splits
from ..data.plan import load_plans
from ..data.plans import Plans
from ..data.preprocess import load_case
from ..errors import UserError
from ..io import read_json, write_image, write_json
from ..io.jsonio import atomic_write
from ..network import kernels
from ..network.registry import build_network
from ..runtime import autocast, resolve_amp, resolve_device
from . import budget as budget_rules
from .augment import AugmentConfig, dummy_2d_for
from .config import PAPER_LR, TRAIN_DEVICES, TrainConfig
from .loader import BatchStream, batch_loader
from .sampler import PatchSampler
from .step import build_optimizer, grad_scaler, recipe_loss, train_step


class TrainingInterrupted(Exception):
    """SIGTERM (or a stop request) ended training; ``checkpoint_latest.pt`` holds the state to resume."""


def _dist_env() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def _seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] % (2**63))


def split_batch(batch: int, world: int) -> list[int]:
    """The global batch split over ``world`` processes as evenly as possible (nnU-Net v2's rule)."""
    if batch < world:
        raise UserError(f"batch size {batch} is smaller than the number of processes ({world})")
    return [batch // world + (1 if r < batch % world else 0) for r in range(world)]


def poly_lr(base: float, progress: float, exponent: float) -> float:
    """``base * (1 - progress) ** exponent`` with progress clipped to [0, 1]."""
    return base * (1.0 - min(max(progress, 0.0), 1.0)) ** exponent


class Trainer:
    """Trains UNETR++ on a planned, preprocessed dataset; see the module docstring for the run folder."""

    def __init__(self, dataset: str | os.PathLike, config: TrainConfig, out_dir: str | os.PathLike | None = None,
                 progress: bool | None = None, echo: bool = True):
        self.cfg = config
        self.root = Path(dataset)
        self.rank, self.world, self.local_rank = _dist_env()
        self.is_main = self.rank == 0
        self.echo = echo and self.is_main
        self.progress = (sys.stderr.isatty() if progress is None else progress) and self.is_main
        self._t0 = time.perf_counter()
        self.ds = Dataset.open(self.root)
        plans_path = self.root / "plans.json"
        if not plans_path.exists():
            raise FileNotFoundError(f"{plans_path}: no plans; run `unetrpp plan {self.root}` first")
        self.plans = load_plans(plans_path)
        if config.preset is not None and config.preset != self.plans.preset:
            planned = f"preset {self.plans.preset}" if self.plans.preset else "a network planned from the data"
            raise UserError(f"--preset {config.preset} contradicts {plans_path} ({planned}); leave --preset out, "
                             f"or re-plan with `unetrpp plan {self.root} --preset {config.preset}`")
        self.pre_dir = self.root / "preprocessed"
        self._check_preprocessed()
        fold = config.fold
        if fold == "all":
            names = sorted(c.name for c in self.ds.training_cases())
            self.train_names, self.val_names = names, names
        else:
            splits = load_splits(self.root)
            if not 0 <= fold < len(splits):
                raise UserError(f"{self.root / 'splits.json'}: fold {fold} does not exist ({len(splits)} folds)")
            self.train_names, self.val_names = splits[fold]["train"], splits[fold]["val"]
        if not self.val_names:
            self.val_names = self.train_names
        self.run_name = self.plans.preset or self.plans.arch  # unetrpp, or the baseline's name
        self.out = Path(out_dir) if out_dir else self.root / "results" / f"{self.run_name}_fold{fold}"
        self.global_batch = int(config.batch_size or self.plans.batch_size)
        self.batch = split_batch(self.global_batch, self.world)[self.rank]
        self.device = self._device()
        resolve_amp(config.amp, self.device)  # fp16 needs CUDA
        self._set_network(list(config.patch_size or self.plans.patch_size), config.model_overrides)
        classes = config.online_eval_classes
        if classes is None and self.plans.eval_classes and self.num_classes == self.plans.num_classes:
            classes = list(self.plans.eval_classes)  # the paper's evaluated labels (Synapse: 8 of 13 organs)
        self.eval_classes = list(classes) if classes else list(range(1, self.num_classes))
        bd = config.batch_dice if config.batch_dice is not None else self.plans.batch_dice
        self.loss_fn = recipe_loss(bd)
        self._log_file = None
        self._stop: str | None = None
        self._logged_a_step = False
        self._final_val: tuple[list[str], bool] = (list(self.val_names), config.final_validation_tta)
        self._deadline = self._train_deadline = None
        self._pretrained: torch.nn.Module | None = None  # fine-tuning: the source network, until transferred

    def _set_network(self, patch: list[int], overrides: dict) -> None:
        """The network to train: the plans' at ``patch`` with constructor ``overrides`` (e.g. a width)."""
        self.patch = [int(p) for p in patch]
        try:
            cfg = self.plans.network_config(img_size=self.patch, **overrides)
        except TypeError as e:
            raise UserError(f"model_overrides: {e}") from None
        self.model_config = cfg.to_dict()
        self.num_classes = cfg.out_channels
        deepest = math.prod(cfg.deepest_shape)
        if self.batch * deepest < 2:
            raise UserError(f"patch {self.patch} with {self.batch} sample(s) per process leaves one voxel at the "
                             "deepest stage, where batch norm needs two; use a larger patch or batch")
        self.augment = self.cfg.augment_config(dummy_2d_for(self.patch))

    def _adopt_pretrained(self) -> None:
        """Fine-tuning: the network takes the pretrained one's architecture (width, blocks, heads, stem
        stride) with the run's classes and patch, recorded in ``model_overrides`` (a resume rebuilds it
        from there, without the pretrained file); its weights are transferred in ``_run``."""
        from .pretrained import architecture, load_pretrained

        path = self.cfg.pretrained
        member, count = load_pretrained(path)
        if count > 1:
            self.log(f"{path} holds {count} networks: fine-tuning from the first ({member.name})")
        net = member.network
        arch = architecture(net.config)
        kind = arch.get("arch", "unetrpp")
        if kind != self.plans.arch:
            raise UserError(f"{path} is a {kind} network, the plans of {self.root} describe {self.plans.arch}; "
                             f"re-plan with `unetrpp plan {self.root} --arch {kind}` to fine-tune it")
        if arch["in_channels"] != self.plans.num_channels:
            raise UserError(f"{path} takes {arch['in_channels']} channel(s), dataset {self.root} has "
                             f"{self.plans.num_channels}")
        overrides = {**self.cfg.model_overrides, **arch}
        try:
            self._set_network(self.patch, overrides)
        except ValueError as e:
            raise UserError(f"{path}: its network does not fit this run: {str(e).splitlines()[0]} (choose a "
                             "--patch-size for it)") from None
        # the budget's patch ladder then shrinks patches in this network's multiples
        self.plans = dataclasses.replace(self.plans, network={**self.plans.network, **arch})
        self.cfg = dataclasses.replace(self.cfg, model_overrides=overrides)
        self._pretrained = net
        shape = (f"depths {arch['depths']}, stem stride {arch['stem_stride']}" if kind == "unetrpp"
                 else f"{kind}, strides {arch.get('strides')}")
        self.log(f"fine-tuning from {path}: its network (width {arch['feature_size']}, {shape}) with "
                 f"{self.num_classes} classes at patch {self.patch}")

    # ------------------------------------------------------------------ setup
    def _check_preprocessed(self) -> None:
        marker = self.pre_dir / "plans.json"
        if not marker.exists():
            raise FileNotFoundError(f"{self.pre_dir}: not preprocessed; run `unetrpp preprocess {self.root}`")
        if Plans.coerce(read_json(marker), str(marker)).id != self.plans.id:
            raise UserError(f"{self.pre_dir}: preprocessed with other plans; rerun `unetrpp preprocess {self.root}`")

    def _train_coarser(self, scale: list[float]) -> None:
        """Train at the plans' spacing times ``scale`` (budget rule 2): preprocess the dataset for it
        once, into a folder of its own (a rerun or a resume finds it done), and train from there."""
        from ..data.preprocess import preprocess_dataset

        base = self.plans
        spacing = [float(t) * float(f) for t, f in zip(base.target_spacing, scale, strict=True)]
        median = base.median_shape_after_resampling
        self.plans = dataclasses.replace(
            base, target_spacing=spacing,
            median_shape_after_resampling=[m / f for m, f in zip(median, scale, strict=True)] if median else median,
            decisions=[*base.decisions, f"train: a short run trains at {[round(v, 4) for v in spacing]} mm"])
        self.pre_dir = self.root / f"preprocessed_{self.plans.id}"
        if self.is_main:
            t = time.perf_counter()
            summary = preprocess_dataset(self.root, self.pre_dir, self.plans, workers=max(1, self.cfg.workers))
            self.log(f"preprocessed {summary['processed']} case(s) at {[round(v, 3) for v in spacing]} mm into "
                     f"{self.pre_dir.name} in {time.perf_counter() - t:.0f} s")
        if self.world > 1:
            dist.barrier()
        self._check_preprocessed()

    def _device(self) -> torch.device:
        device = resolve_device(self.cfg.device, kinds=TRAIN_DEVICES)
        if device.type == "cuda":  # several processes: each its own GPU
            return torch.device("cuda", self.local_rank if self.world > 1 else device.index or 0)
        return device

    def log(self, msg: str) -> None:
        if not self.is_main:
            return
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}"
        if self._log_file is not None:
            self._log_file.write(line + "\n")
            self._log_file.flush()
        if self.echo:
            print(msg, flush=True)

    # ------------------------------------------------------------------ checkpoints
    def _payload(self, model, optimizer, scaler, epoch: int, state: dict, full: bool = True) -> Checkpoint:
        """The run as it stands; ``full``: with what ``--resume`` needs (optimizer, scaler, RNG, kernel choices)."""
        module = model.module if hasattr(model, "module") else model
        training = TrainingState(
            train_config=self.cfg.to_json(), epoch=epoch,
            iteration=int(state.get("iteration", 0)), epoch_loss=float(state.get("epoch_loss", 0.0)),
            **{k: state[k] for k in ("ema", "best_ema", "history", "elapsed")})
        if full:
            training.optimizer = optimizer.state_dict()
            training.scaler = scaler.state_dict() if scaler.is_enabled() else {}
            training.rng = {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            }
            training.weight_grad_choices = dict(kernels.WEIGHT_GRAD_CHOICES)
        return Checkpoint(network=self.model_config, state_dict={k: v.detach().cpu() for k, v in
                                                                 module.state_dict().items()},
                          plans=self.run_plans().to_dict(), labels=self.ds.labels,
                          channel_names=self.ds.channel_names, file_ending=self.ds.file_ending, training=training)

    def run_plans(self) -> Plans:
        """The plans as this run trains them: its network, patch and batch."""
        return dataclasses.replace(self.plans, network=dict(self.model_config), patch_size=list(self.patch),
                                   batch_size=self.global_batch)

    def _save(self, name: str, ckpt: Checkpoint, say: bool = False) -> None:
        if self.is_main:
            path = save_checkpoint(ckpt, self.out / name)
            if say:
                self.log(f"wrote {path.name} ({path.stat().st_size / 1e6:.1f} MB"
                         + (", no optimizer state)" if ckpt.training.optimizer is None else ")"))

    # ------------------------------------------------------------------ main loop
    def run(self, resume: bool = False) -> dict:
        """Train (or continue), then validate whole cases; returns the final summary."""
        if self.world > 1 and not dist.is_initialized():
            # long enough for rank 0's final validation while the others wait at the barrier
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo", timeout=timedelta(hours=6))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = True
        latest = self.out / "checkpoint_latest.pt"
        if not resume and latest.exists():
            raise UserError(f"{self.out}: a run is already there; pass --resume to continue it or choose another "
                             "output folder")
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.out / "log.txt", "a")  # noqa: SIM115 (closed in finally)
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            return self._run(resume, latest)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None

    def _on_sigterm(self, signum, frame) -> None:
        self._stop = "SIGTERM"

    def request_stop(self, why: str = "stop requested") -> None:
        """Ask the run to save ``checkpoint_latest.pt`` after the current iteration and stop."""
        self._stop = why

    def _plan_budget(self, ckpt: Checkpoint | None) -> None:
        """Resolve the recipe (short run or paper's) and the final validation for the budget."""
        if ckpt is None and self.cfg.pretrained:
            self._adopt_pretrained()
        cfg = self.cfg
        if ckpt is not None:  # a resumed run keeps what it chose at its start
            saved = TrainConfig.from_json(ckpt.training.train_config)
            keep = ("recipe", "optimizer", "lr", "patch_size", "model_overrides", "iters_per_epoch", "val_iters",
                    "recipe_notes", "spacing_scale", "pretrained", "pretrained_report")
            self.cfg = dataclasses.replace(cfg, **{k: getattr(saved, k) for k in keep})
            if self.cfg.spacing_scale:
                self._train_coarser(self.cfg.spacing_scale)
            self._set_network(list(self.cfg.patch_size or self.plans.patch_size), self.cfg.model_overrides)
        budget_s = 60 * cfg.time_budget_min if cfg.time_budget_min else None
        probe = None
        if ckpt is None and budget_s and cfg.recipe != "paper" and not self.is_main:
            pass  # rank 0 measures and decides; the decision arrives below
        elif ckpt is None and budget_s and cfg.recipe != "paper":
            # fine-tuning keeps the pretrained width (in model_overrides) but may still choose the patch
            tuning = bool(cfg.pretrained)
            fixed = bool(cfg.patch_size) or ("feature_size" in cfg.model_overrides and not tuning)
            why = ": the network is fixed" if fixed else ": the width is the pretrained network's" if tuning else ""
            self.log(f"planning the run for a {cfg.time_budget_min:g}-min budget on {self.device} "
                     f"({torch.get_num_threads()} threads){why}")
            probe = budget_rules.plan_run(
                self.plans, budget_s, self.device, self.batch, cfg.amp,
                {**self.model_config, **cfg.model_overrides}, patch=self.patch,
                width=self.model_config["feature_size"], fixed_network=fixed,
                **({"fixed_width": True} if tuning and not fixed else {}), log=self.log)
            short = probe.short or cfg.recipe == "short"
            changes: dict = {"recipe": "short" if short else "paper", "recipe_notes": probe.notes}
            if short:
                changes.update(optimizer=cfg.optimizer or budget_rules.SHORT_OPTIMIZER,
                               lr=cfg.lr or budget_rules.SHORT_LR)
                if not fixed:
                    changes.update(patch_size=probe.patch,
                                   model_overrides={**cfg.model_overrides, "feature_size": probe.feature_size})
                    extent = budget_rules.foreground_extent(self.pre_dir, self.train_names)
                    scale = budget_rules.coarser_spacing(self.patch, probe.patch, extent)
                    if scale:
                        changes["spacing_scale"] = scale
                        spacing = [round(t * f, 4) for t, f in zip(self.plans.target_spacing, scale, strict=True)]
                        note = (f"the affordable patch {tuple(probe.patch)} covers under half of the labelled "
                                f"anatomy (median extent {tuple(round(e) for e in extent)} voxels): training at "
                                f"{spacing} mm (the plans' spacing x {[round(f, 3) for f in scale]})")
                        probe.notes.insert(len(probe.notes) - 1, note)  # the recipe line stays last
                        self.log(note)
                if cfg.iters_per_epoch == 250 and cfg.val_iters == 50:  # the defaults: epochs of about a minute
                    changes.update(iters_per_epoch=probe.iters_per_epoch, val_iters=probe.val_iters)
            self.cfg = dataclasses.replace(cfg, **changes)
            self._set_network(list(self.cfg.patch_size or self.plans.patch_size), self.cfg.model_overrides)
        elif ckpt is None:
            short = cfg.recipe == "short"
            self.cfg = dataclasses.replace(cfg, recipe="short" if short else "paper",
                                           optimizer=cfg.optimizer or ("adamw" if short else "sgd"),
                                           lr=cfg.lr or (budget_rules.SHORT_LR if short else PAPER_LR))
        if self.world > 1:  # every process trains what rank 0 chose
            box = [self.cfg]
            dist.broadcast_object_list(box, 0)
            self.cfg = box[0]
        if ckpt is None and self.cfg.spacing_scale:
            self._train_coarser(self.cfg.spacing_scale)
        if self.world > 1 or (ckpt is None and self.cfg.spacing_scale):
            self._set_network(list(self.cfg.patch_size or self.plans.patch_size), self.cfg.model_overrides)
        for line in self.cfg.recipe_notes[-1:]:
            self.log(line)
        self._deadline = self._train_deadline = None
        if budget_s:
            self._deadline = self._t0 + budget_s * (1 - budget_rules.MARGIN_FRACTION)
            reserve = 0.0
            if self.cfg.final_validation and self.is_main:
                fwd = probe.forward_s if probe is not None and probe.patch == self.patch else None
                if fwd is None:
                    fwd = budget_rules.measure_step(self.model_config, self.batch, self.device, self.cfg.amp,
                                                    steps=1)[1]
                windows = budget_rules.windows_per_case(self.plans.median_shape_after_resampling or self.patch,
                                                        self.patch)
                left = self._deadline - time.perf_counter()
                n, tta, why = budget_rules.plan_final_validation(
                    len(self.val_names), windows, fwd, budget_rules.FINAL_VALIDATION_FRACTION * budget_s,
                    self.cfg.final_validation_tta)
                self._final_val = (budget_rules.evenly_spaced(sorted(self.val_names), n), tta)
                per_case = windows * fwd * (budget_rules.MIRRORS if tta else 1) + budget_rules.CASE_OVERHEAD_S
                reserve = min(n * per_case, max(left, 0.0))
                self.log(f"final validation planned: {why}")
            # the final checkpoints and, until an epoch has measured it, a first guess of an epoch's tail
            self._train_deadline = self._deadline - reserve - budget_rules.END_RESERVE_S
            fwd = probe.forward_s if probe is not None else 0.0
            self._tail_guess = budget_rules.END_RESERVE_S + self.cfg.val_iters * self.batch * fwd

    def _run(self, resume: bool, latest: Path) -> dict:
        ckpt = Checkpoint.load(latest, map_location="cpu") if resume and latest.exists() else None
        if ckpt is not None:
            lacking = ckpt.resume_lacks()
            if lacking:
                raise UserError(f"{latest}: cannot resume from it: it lacks {', '.join(lacking)} (a final or best "
                                 "checkpoint holds no training state)")
            try:
                saved = TrainConfig.from_json(ckpt.training.train_config)
            except (TypeError, ValueError, KeyError) as e:
                raise UserError(f"{latest}: cannot resume from it: bad train_config ({e})") from None
            if (saved.preset or self.plans.preset) != (self.cfg.preset or self.plans.preset) \
                    or saved.fold != self.cfg.fold:
                raise UserError(f"{latest}: was trained with another preset or fold; cannot resume")
        self._plan_budget(ckpt)
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        model = self.build_model().to(self.device)
        if ckpt is None and self._pretrained is not None:
            from .pretrained import describe, transfer_weights

            src, self._pretrained = self._pretrained, None
            report = transfer_weights(model, src.state_dict(), cfg.pretrained, getattr(src, "config", None))
            self.cfg = cfg = dataclasses.replace(cfg, pretrained_report=report)
            self.log(describe(report))
        if cfg.activation_checkpointing:
            if not hasattr(model, "activation_checkpointing"):
                raise UserError(f"activation_checkpointing: {type(model).__name__} has no such switch")
            model.activation_checkpointing = True
        optimizer = build_optimizer(model.parameters(), cfg, self.device)
        scaler = grad_scaler(cfg.amp)
        state = {"ema": None, "best_ema": None, "history": [], "elapsed": 0.0, "iteration": 0, "epoch_loss": 0.0}
        start_epoch = 0
        if ckpt is not None:
            saved = ckpt.training
            if ckpt.network != self.model_config:
                raise UserError(f"{latest}: was trained with another network; cannot resume")
            try:
                model.load_state_dict(ckpt.state_dict)
                optimizer.load_state_dict(saved.optimizer)
            except (RuntimeError, ValueError, KeyError, TypeError) as e:
                raise UserError(f"{latest}: cannot resume from it: {str(e).strip().splitlines()[0][:200]}") from None
            try:
                if saved.scaler:
                    scaler.load_state_dict(saved.scaler)
                torch.set_rng_state(saved.rng["torch"])
                if saved.rng.get("cuda") and torch.cuda.is_available():
                    torch.cuda.set_rng_state_all(saved.rng["cuda"])
            except (RuntimeError, ValueError, KeyError, TypeError) as e:
                raise UserError(f"{latest}: cannot resume from it: bad scaler or RNG state "
                                f"({str(e).strip().splitlines()[0][:200]})") from None
            # the kernels the interrupted run timed and chose: a re-timing could choose others and round differently
            kernels.WEIGHT_GRAD_CHOICES.update(saved.weight_grad_choices)
            state = {k: getattr(saved, k) for k in ("ema", "best_ema", "history", "elapsed", "iteration", "epoch_loss")}
            start_epoch = int(saved.epoch)
            where = f" iteration {state['iteration']}" if state["iteration"] else ""
            self.log(f"resumed from {latest} at epoch {start_epoch}{where}")
            if cfg.pretrained:
                self.log(f"(fine-tuned from {cfg.pretrained}: its weights are not reloaded)")
        elif resume:
            self.log(f"--resume: no checkpoint in {self.out}; starting from scratch")
        if self.is_main:
            write_json(cfg.to_json(), self.out / "train_config.json")
            self.run_plans().save(self.out / "plans.json")
        train_model = model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # nnU-Net's deeper heads (beyond the recipe's three) get no gradient
            unused = bool(getattr(model, "has_unused_parameters", False))
            train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                                                    find_unused_parameters=unused)
        n_params = sum(p.numel() for p in model.parameters())
        self.log(f"training {self.run_name} fold {cfg.fold} on {self.device} x{self.world}: {len(self.train_names)} "
                 f"train / {len(self.val_names)} val cases, patch {self.patch}, batch {self.global_batch}, width "
                 f"{self.model_config['feature_size']}, {n_params / 1e6:.2f} M parameters, {cfg.recipe} recipe "
                 f"({cfg.optimizer} lr {cfg.lr:g}), amp {cfg.amp}, epochs {cfg.epochs} x {cfg.iters_per_epoch}"
                 + (f", time budget {cfg.time_budget_min:g} min (training until "
                    f"{(self._train_deadline - self._t0) / 60:.1f} min)" if cfg.time_budget_min else ""))

        epoch = start_epoch
        self._t_process = time.perf_counter()
        self._elapsed0 = float(state["elapsed"])
        if self._deadline is not None and self._elapsed0:  # the budget is the whole job's, earlier runs included
            self._deadline -= self._elapsed0
            self._train_deadline -= self._elapsed0
        self._iter_s = 0.0  # measured: one training iteration
        self._tail_s = getattr(self, "_tail_guess", 0.0)  # validation + writing of an epoch (measured after one)
        self._last_ckpt = time.perf_counter()
        while epoch < cfg.epochs:
            elapsed = self._elapsed()
            if self._out_of_time():
                self.log(f"time budget reached after {elapsed / 60:.1f} min: stopping before epoch {epoch}")
                break
            t0 = time.perf_counter()
            lr = self.lr_at(epoch, elapsed)
            for g in optimizer.param_groups:
                g["lr"] = lr
            train_loss, iters = self._train_epoch(train_model, optimizer, scaler, epoch, state)
            t_tail = time.perf_counter()
            val_loss, dice = self._validate_epoch(model, epoch)
            mean = float(np.nanmean([dice[c] for c in self.eval_classes])) if any(
                not math.isnan(dice[c]) for c in self.eval_classes) else math.nan
            if not math.isnan(mean):
                a = cfg.ema_alpha
                state["ema"] = mean if state["ema"] is None else a * state["ema"] + (1 - a) * mean
            row = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "pseudo_dice": mean,
                   "ema_dice": state["ema"] if state["ema"] is not None else math.nan, "lr": lr,
                   "iterations": iters, "epoch_time_s": time.perf_counter() - t0}
            row.update({f"dice_{self._class_name(c)}": dice[c] for c in range(1, self.num_classes)})
            epoch += 1
            state["elapsed"] = self._elapsed()
            state["iteration"], state["epoch_loss"] = 0, 0.0
            row["elapsed_s"] = state["elapsed"]
            state["history"].append(row)
            improved = state["ema"] is not None and (state["best_ema"] is None or state["ema"] > state["best_ema"])
            if improved:
                state["best_ema"] = state["ema"]
            self._save("checkpoint_latest.pt", self._payload(model, optimizer, scaler, epoch, state))
            self._last_ckpt = time.perf_counter()
            if improved:
                self._save("checkpoint_best.pt", self._payload(model, optimizer, scaler, epoch, state, full=False))
            self._write_progress(state["history"])
            if self._agree(self._stop is not None):
                raise TrainingInterrupted(f"{self._stop}: saved {self.out / 'checkpoint_latest.pt'} at the end of "
                                          f"epoch {epoch - 1}; continue with --resume")
            self._tail_s = time.perf_counter() - t_tail
            self.log(f"epoch {epoch - 1}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, pseudo-Dice "
                     f"{mean:.4f} (EMA {row['ema_dice']:.4f}{', best' if improved else ''}), lr {lr:.2e}, "
                     f"{iters} it, {row['epoch_time_s']:.1f} s, {state['elapsed'] / 60:.1f} min in all")
        state["elapsed"] = self._elapsed()
        self._save("checkpoint_final.pt", self._payload(model, optimizer, scaler, epoch, state, full=False), say=True)
        self._save("checkpoint_latest.pt", self._payload(model, optimizer, scaler, epoch, state))
        if self.is_main and (self.out / "checkpoint_best.pt").exists():
            size = (self.out / "checkpoint_best.pt").stat().st_size
            self.log(f"checkpoint_best.pt: {size / 1e6:.1f} MB, no optimizer state")
        self.log(f"training done: {epoch} epoch(s), {state['elapsed'] / 60:.1f} min; wrote {self.out}")
        summary = {"epochs": epoch, "iterations": sum(h.get("iterations", 0) for h in state["history"]),
                   "elapsed_s": state["elapsed"], "best_ema_dice": state["best_ema"]}
        if cfg.final_validation:
            summary["validation"] = self.validate_cases(model)
        if self.world > 1:
            dist.barrier()
        return summary

    # ------------------------------------------------------------------ pieces
    def build_model(self) -> torch.nn.Module:
        """The network the plans describe (UNETR++ or a baseline of ``network.registry``), freshly initialised."""
        return build_network(self.model_config)

    def _class_name(self, c: int) -> str:
        return {v: k for k, v in self.ds.labels.items()}.get(c, str(c))

    def _elapsed(self) -> float:
        return self._elapsed0 + time.perf_counter() - self._t_process

    def lr_at(self, epoch: int, elapsed_s: float = 0.0) -> float:
        progress = epoch / self.cfg.epochs
        if self._train_deadline is not None:  # the schedule follows the training part of the budget
            span = self._train_deadline + self._elapsed0 - self._t0
            progress = max(progress, (elapsed_s + self._t_process - self._t0) / max(span, 1e-9))  # since t0
        elif self.cfg.time_budget_min:
            progress = max(progress, elapsed_s / (60 * self.cfg.time_budget_min))
        return poly_lr(self.cfg.lr, progress, self.cfg.poly_exponent)

    def _out_of_time(self, tail: bool = True) -> bool:
        """Whether one more iteration (plus the epoch's validation and writing) would pass the training deadline."""
        if self._train_deadline is None:
            return False
        stop = time.perf_counter() + self._iter_s + (self._tail_s if tail else 0.0) > self._train_deadline
        return self._agree(stop)

    def _agree(self, flag: bool) -> bool:
        """Rank 0's decision, on every process."""
        if self.world > 1:
            t = torch.tensor([int(flag)], device=self.device if self.device.type == "cuda" else "cpu")
            dist.broadcast(t, 0)
            flag = bool(t.item())
        return flag

    def _seed_epoch(self, epoch: int) -> None:
        torch.manual_seed(_seed_of(self.cfg.seed, self.rank, epoch))

    def _train_epoch(self, model, optimizer, scaler, epoch: int, state: dict) -> tuple[float, int]:
        """Mean loss and number of iterations (fewer than configured when the time budget ends the epoch)."""
        cfg = self.cfg
        start = int(state.get("iteration", 0))
        if not start:  # a mid-epoch resume continues the restored random state instead
            self._seed_epoch(epoch)
        model.train()
        stream = BatchStream(seed=[cfg.seed, epoch], rank=self.rank, start=start, folder=self.pre_dir,
                             names=self.train_names, patch_size=self.patch, batch_size=self.batch,
                             augment=self.augment, oversample_foreground=cfg.oversample_foreground)
        loader = batch_loader(stream, workers=cfg.workers, pin_memory=self.device.type == "cuda")
        rng = torch.get_rng_state()  # starting workers draws from it: keep dropout's stream independent of that
        batches = iter(loader)
        torch.set_rng_state(rng)
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.iters_per_epoch, initial=start, desc=f"epoch {epoch}", unit="it", leave=False)
        total = torch.tensor(float(state.get("epoch_loss", 0.0)), dtype=torch.float64)
        done = start
        t_log, done_log, loss_log = time.perf_counter(), done, total.clone()
        try:
            for i in range(start, cfg.iters_per_epoch):
                if i > start and self._out_of_time():
                    break
                t_iter = time.perf_counter()
                x, y = next(batches)
                x = x.to(self.device, non_blocking=True)
                y = y.to(self.device, non_blocking=True)
                if self._train_deadline is not None:
                    lr = self.lr_at(epoch, self._elapsed())
                    if self.world > 1:  # rank 0's clock: the processes' weights must stay identical
                        t = torch.tensor([lr], dtype=torch.float64, device=self.device if self.device.type == "cuda"
                                         else "cpu")
                        dist.broadcast(t, 0)
                        lr = float(t.item())
                    for g in optimizer.param_groups:
                        g["lr"] = lr
                try:
                    loss = train_step(model, optimizer, self.loss_fn, x, y, scaler, cfg.amp, cfg.grad_clip)
                except FloatingPointError as e:
                    raise FloatingPointError(f"epoch {epoch}: {e}") from None
                total += loss.detach().double().cpu()
                done += 1
                now = time.perf_counter()
                spent = now - t_iter  # the first of an epoch also waits for the loader to start
                if not self._iter_s:
                    self._iter_s = spent
                elif i > start:
                    self._iter_s = 0.8 * self._iter_s + 0.2 * spent
                if bar:
                    bar.update()
                    bar.set_postfix(loss=f"{loss.item():.3f}")
                if now - t_log >= cfg.log_every_s or not self._logged_a_step:  # the first step, then each interval
                    self._logged_a_step = True
                    n = done - done_log
                    rate = n / max(now - t_log, 1e-9)
                    left = (cfg.iters_per_epoch - done) / max(rate, 1e-9)
                    eta = f", run ends in {(self._deadline - now) / 60:.1f} min" if self._deadline else ""
                    self.log(f"epoch {epoch} iteration {done}/{cfg.iters_per_epoch}: loss "
                             f"{float((total - loss_log) / max(n, 1)):.4f}, {rate:.2f} it/s, epoch ETA {left:.0f} s"
                             f"{eta}")
                    t_log, done_log, loss_log = now, done, total.clone()
                stop = self._stop is not None
                save = stop or now - self._last_ckpt >= 60 * cfg.checkpoint_every_min
                if self._agree(save) and done < cfg.iters_per_epoch:
                    state.update(iteration=done, epoch_loss=float(total), elapsed=self._elapsed())
                    self._save("checkpoint_latest.pt", self._payload(model, optimizer, scaler, epoch, state))
                    self._last_ckpt = time.perf_counter()
                    self.log(f"checkpoint_latest.pt written at epoch {epoch} iteration {done}")
                if self._agree(stop) and done < cfg.iters_per_epoch:
                    raise TrainingInterrupted(f"{self._stop or 'stopped'}: saved {self.out / 'checkpoint_latest.pt'} "
                                              f"at epoch {epoch} iteration {done}; continue with --resume")
        finally:
            if bar:
                bar.close()
            del batches, loader
        mean = total / max(done, 1)
        if self.world > 1:
            mean = mean.to(self.device if self.device.type == "cuda" else "cpu")
            dist.all_reduce(mean)
            mean = mean.cpu() / self.world
        return float(mean), done

    @torch.no_grad()
    def _validate_epoch(self, model, epoch: int) -> tuple[float, dict[int, float]]:
        """Loss and per-class Dice of the arg-max over ``val_iters`` un-augmented validation batches."""
        cfg = self.cfg
        k = self.num_classes
        counts = torch.zeros(3, k, dtype=torch.float64)  # tp, fp, fn
        loss_sum = torch.zeros((), dtype=torch.float64)
        if cfg.val_iters:
            model.eval()
            sampler = PatchSampler(self.pre_dir, self.val_names, self.patch, self.batch, AugmentConfig.off(),
                                   cfg.oversample_foreground, seed=[cfg.seed, 1, self.rank, epoch])
            for _ in range(cfg.val_iters):
                xb, yb = sampler.batch()
                x = torch.from_numpy(xb).to(self.device)
                y = torch.from_numpy(yb.astype(np.int64)).to(self.device)
                with autocast(self.device, cfg.amp):
                    out = model(x)
                loss_sum += self.loss_fn(out, y).double().cpu()
                pred = (out[0] if isinstance(out, (list, tuple)) else out).argmax(1)
                for c in range(1, k):
                    p, g = pred == c, y == c
                    counts[0, c] += (p & g).sum().item()
                    counts[1, c] += (p & ~g).sum().item()
                    counts[2, c] += (~p & g).sum().item()
        if self.world > 1:
            packed = torch.cat([counts.flatten(), loss_sum.reshape(1)])
            packed = packed.to(self.device if self.device.type == "cuda" else "cpu")
            dist.all_reduce(packed)
            packed = packed.cpu()
            counts, loss_sum = packed[:-1].reshape(3, k), packed[-1] / self.world
        tp, fp, fn = counts
        dice = {c: (2 * tp[c] / (2 * tp[c] + fp[c] + fn[c])).item() if (tp[c] + fp[c] + fn[c]) > 0 else math.nan
                for c in range(1, k)}
        return float(loss_sum / max(cfg.val_iters, 1)), dice

    # ------------------------------------------------------------------ outputs
    def _write_progress(self, history: list[dict]) -> None:
        if not self.is_main or not history:
            return
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(history[0]))
        w.writeheader()
        for row in history:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        data = buf.getvalue().encode()
        atomic_write(self.out / "progress.csv", lambda f: f.write(data))
        from .report import plot_progress

        plot_progress(history, self.out / "progress.png")

    def validate_cases(self, model) -> dict:
        """Full-case sliding-window prediction of the validation cases, written and scored on the original grid.

        With a time budget: the cases and mirroring planned at the start (``_plan_budget``), and no
        case is started that would end after the deadline (the summary says how many were done).
        """
        from ..evaluation.evaluate import evaluate_pairs, print_table
        from ..inference.predictor import Predictor

        if not self.is_main:  # rank 0 alone predicts and writes; the others wait at the final barrier
            return {}
        names, tta = self._final_val
        if not names:
            self.log("final validation skipped: it does not fit the time budget")
            return {}
        out = self.out / "validation"
        out.mkdir(parents=True, exist_ok=True)
        predictor = Predictor(model, self.run_plans(), self.ds.labels, device=self.device, tta=tta,
                              amp=self.cfg.amp, progress=self.progress)
        ending = self.ds.file_ending
        t0 = time.perf_counter()
        done: list[str] = []
        for name in names:
            now = time.perf_counter()
            per_case = (now - t0) / len(done) if done else 0.0
            if self._deadline is not None and now + per_case > self._deadline:
                break
            data, _, _, props = load_case(self.pre_dir, name)
            result = predictor.predict_preprocessed(data, props)
            write_image(result.label, result.geometry, out / f"{name}{ending}")
            done.append(name)
        if not done:
            self.log("final validation skipped: no time left in the budget")
            return {}
        pairs = [(name, self.ds.case(name).label, out / f"{name}{ending}") for name in done]
        classes = {self._class_name(c): [c] for c in self.eval_classes}
        summary = evaluate_pairs(pairs, classes, workers=1)
        summary["seconds"] = time.perf_counter() - t0
        summary["tta"] = tta
        summary["cases_validated"] = len(done)
        summary["cases_in_fold"] = len(self.val_names)
        write_json(summary, out / "summary.json")
        partial = "" if len(done) == len(self.val_names) else f" ({len(done)} of {len(self.val_names)}: time budget)"
        self.log(f"validation of {len(pairs)} case(s){partial} (sliding window, TTA {'on' if tta else 'off'}): "
                 f"mean Dice {summary['mean_dice']:.4f}")
        self.log(print_table(summary))
        return summary
