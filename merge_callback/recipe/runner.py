"""One run of the recipe: :func:`prepare` checks every input and loads the data and model without
writing anything (a folder that holds a run needs ``resume`` or ``overwrite``); :func:`execute`
trains, merges and writes the outputs; :func:`run` does both."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from merge_callback.lightning import BayesMergeCallback
from merge_callback.recipe.callbacks import (KeepNewest, OutOfDomainCallback, StepProgressBar,
                                             step_of)
from merge_callback.recipe.checks import (check_model_ref, check_not_below_file,
                                          check_writable_folder)
from merge_callback.recipe.config import (OBSOLETE_KEYS, RecipeConfig, RecipeError, dump_config,
                                          load_config, read_yaml_mapping)
from merge_callback.recipe.console import quiet_third_party, say
from merge_callback.recipe.data import (RecipeData, eval_loader, load_texts, prepare_data,
                                        train_loader)
from merge_callback.recipe.loggers import build_loggers, wandb_run_id
from merge_callback.recipe.model import (export_soup, load_model_and_tokenizer,
                                         pretrain_base_model, require_recipe_dependencies,
                                         resolved_precision)
from merge_callback.recipe.report import format_value, round_records, write_report

__all__ = ["run", "prepare", "execute", "RunPlan", "RUN_OUTPUTS", "RESUME_MAY_CHANGE"]


RUN_OUTPUTS = ("config.yaml", "base_model", "checkpoints", "soups", "final_soup", "report.md",
               "rounds.json", "lambda.png", "heldout.png", "curve.png", "logs", "wandb")
"""What a run writes into ``output_dir`` (``--overwrite`` deletes these and nothing else)."""

RESUME_MAY_CHANGE = ("max_steps", "progress_bar", "num_threads", "num_workers", "logger",
                     "wandb_project", "wandb_mode", "export_final_soup", "keep_checkpoints",
                     "keep_soups", "output_dir", "hf_cache_dir")
"""Keys a ``--resume`` may change; another difference from the run's ``config.yaml`` is refused."""


def _latest_checkpoint(ckpt_dir: Path) -> Path | None:
    best, best_step = None, -1
    for p in ckpt_dir.glob("step=*.ckpt"):
        try:
            step = int(p.stem.split("=", 1)[1])
        except ValueError:
            continue
        if step > best_step:
            best, best_step = p, step
    return best


def _stored_config(run_dir: Path) -> RecipeConfig | None:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    values, _ = read_yaml_mapping(path)
    for key in OBSOLETE_KEYS:
        values.pop(key, None)
    try:
        return load_config(None, values)
    except ValueError as e:
        raise RecipeError(f"{path} (the run's own config) does not load: {e}; fix it or use "
                          "--overwrite") from None


@dataclass
class RunPlan:
    """What :func:`run` found and prepared before writing anything."""

    config: RecipeConfig
    run_dir: Path
    mode: str  # "new", "resume" or "overwrite"
    delete: list[Path] = field(default_factory=list)
    resume_from: Path | None = None
    done: str | None = None  # a finished run and nothing to do: the message
    train_texts: list[str] = field(default_factory=list)
    data: RecipeData | None = None
    model: Any = None  # None: pretrain the scratch base model first
    tokenizer: Any = None
    model_path: str = ""
    revision: str | None = None
    wandb_id: str | None = None
    seconds: float = 0.0


def prepare(config: RecipeConfig, *, resume: bool = False, overwrite: bool = False) -> RunPlan:
    """Check every input and load the data and model; writes nothing.

    Raises:
        RecipeError: a bad path, an output folder that cannot be written or already holds a run
            (without ``resume``/``overwrite``), a ``resume`` whose config differs.
        ValueError, OSError: data too small, a model or tokenizer that does not load.
        ImportError: a missing dependency (the message says what to install).
    """
    from lightning.pytorch.utilities import rank_zero_only

    t0 = time.perf_counter()
    require_recipe_dependencies()
    if resume and overwrite:
        raise RecipeError("--resume and --overwrite exclude each other: --resume continues the "
                          "run in output_dir, --overwrite deletes it and starts again")
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_dir = Path(config.output_dir).expanduser()
    check_writable_folder("output_dir", run_dir)
    check_not_below_file("hf_cache_dir", config.hf_cache_dir)
    check_model_ref("model", config.model)
    check_model_ref("tokenizer", config.tokenizer)
    if config.logger == "wandb":
        from merge_callback.tracking import require_wandb

        require_wandb()
    plan = RunPlan(config, run_dir, "new")
    found = [n for n in RUN_OUTPUTS if (run_dir / n).exists() or (run_dir / n).is_symlink()] \
        if run_dir.is_dir() else []
    last = _latest_checkpoint(run_dir / "checkpoints")
    last_step = step_of(last) if last is not None else None
    if found and rank_zero_only.rank == 0:  # other DDP ranks re-run the command: rank 0 decided
        stored = _stored_config(run_dir)
        stored_max = stored.max_steps if stored is not None else config.max_steps
        finished = last_step is not None and last_step >= stored_max and \
            (run_dir / "report.md").is_file()
        if not resume and not overwrite:
            if finished:
                state = (f"a finished run (checkpoints up to step {last_step}, report.md); pass "
                         "--resume with a larger --max_steps to train it further")
            elif last_step is not None:
                state = (f"an unfinished run (last checkpoint: step {last_step} of {stored_max}); "
                         "pass --resume to continue it")
            else:
                state = (f"outputs of an earlier run ({', '.join(found)}) but no checkpoint; pass "
                         "--resume to reuse them")
            raise RecipeError(f"output_dir {run_dir} already holds {state}, --overwrite to delete "
                              "its outputs and start again, or choose another --output_dir")
        if overwrite:
            plan.mode, plan.delete = "overwrite", [run_dir / n for n in found]
        else:
            plan.mode = "resume"
            if stored is not None:
                diff = [f"{f.name} ({getattr(stored, f.name)!r} in the run, "
                        f"{getattr(config, f.name)!r} now)" for f in fields(RecipeConfig)
                        if f.name not in RESUME_MAY_CHANGE
                        and getattr(stored, f.name) != getattr(config, f.name)]
                if diff:
                    raise RecipeError(f"--resume: the config differs from {run_dir / 'config.yaml'}"
                                      f" in {'; '.join(diff)}; only "
                                      f"{', '.join(RESUME_MAY_CHANGE)} may change on resume "
                                      "(--overwrite starts again)")
            if last_step is not None and last_step > config.max_steps:
                raise RecipeError(f"--resume: max_steps ({config.max_steps}) is below the run's "
                                  f"last checkpoint (step {last_step}); pass --max_steps "
                                  f"{last_step} or more")
            if finished and last_step == config.max_steps:
                plan.done = (f"{run_dir} already holds a finished run (step {last_step} of "
                             f"{config.max_steps}, {run_dir / 'report.md'}); nothing to do. A "
                             "larger --max_steps trains it further; --overwrite runs it again.")
                return plan
            plan.resume_from = last
            plan.wandb_id = wandb_run_id(run_dir) if (run_dir / "wandb").is_dir() else None
    elif found:
        plan.mode = "resume"
        plan.resume_from = last

    say(f"reading data: train {config.train_data}, held-out "
        f"{config.heldout_data or f'{config.heldout_fraction:g} of the training blocks'}"
        + (f", out-of-domain {config.ood_data}" if config.ood_data else ""))
    plan.train_texts = load_texts(config.train_data, config.max_train_chars, config.text_field)
    base_dir = run_dir / "base_model"
    if config.model == "scratch" and not (plan.mode == "resume"
                                          and (base_dir / "config.json").is_file()):
        from merge_callback.data import train_tokenizer

        n_chars = sum(len(t) for t in plan.train_texts)
        say(f"training a {config.scratch_vocab_size}-token BPE tokenizer on "
            f"{n_chars / 1e6:.1f}M characters and packing {config.block_size}-token blocks")
        plan.tokenizer = train_tokenizer(plan.train_texts, vocab_size=config.scratch_vocab_size)
        plan.model_path, plan.revision = str(base_dir), None
    else:
        path = str(base_dir) if config.model == "scratch" else config.model
        revision = None if config.model == "scratch" else config.revision
        say(f"loading {path}" + (f" @ {revision}" if revision else ""))
        try:
            with quiet_third_party():
                plan.model, plan.tokenizer = load_model_and_tokenizer(
                    path, revision, config.tokenizer, config.hf_cache_dir)
        except OSError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RecipeError(f"model: cannot load {path!r}" + (f" at revision {revision!r}"
                              if revision else "") + f": {first}") from None
        from merge_callback.preflight import model_limits

        _, max_len = model_limits(plan.model)
        if max_len is not None and config.block_size > max_len:
            raise RecipeError(f"block_size must be <= the context length of {path} ({max_len}), "
                              f"got {config.block_size}")
        # room for one more checkpoint (fp32 weights and two AdamW moments) and one soup
        n_params = sum(p.numel() for p in plan.model.parameters())
        check_writable_folder("output_dir", run_dir, need_bytes=16 * n_params)
        plan.model_path, plan.revision = path, revision
    plan.data = prepare_data(config, plan.tokenizer, plan.train_texts)
    s = plan.data.summary()
    say(f"data: {s['train_blocks']:,} training blocks, {s['heldout_blocks']:,} held-out, "
        f"{s['ood_blocks']:,} out-of-domain, {s['block_size']} tokens each "
        f"({time.perf_counter() - t0:.0f} s)")
    plan.seconds = time.perf_counter() - t0
    return plan


def run(config: RecipeConfig, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Run the recipe end to end and return the run folder (``config.output_dir``).

    Every input is checked, the data read and the model loaded before anything is written.

    Args:
        config: the recipe config.
        resume: continue the run in ``output_dir`` from its newest checkpoint (the config may differ
            from the run's ``config.yaml`` only in :data:`RESUME_MAY_CHANGE`); a finished run with
            the same ``max_steps`` is left as it is.
        overwrite: delete the recipe's outputs in ``output_dir`` (:data:`RUN_OUTPUTS`, nothing
            else) and start again.

    Raises:
        RecipeError: bad input, found before anything is written (see :func:`main`), including
            an ``output_dir`` that already holds a run when neither ``resume`` nor ``overwrite``
            is given.
        ImportError: a dependency of the recipe is missing (the message says what to install).
        ValueError, OSError: data too small for the configuration, a model that does not load.
    """
    return execute(prepare(config, resume=resume, overwrite=overwrite))


def execute(plan: RunPlan) -> Path:
    """Train, merge and write the outputs of a run that :func:`prepare` checked and loaded.

    Returns:
        the run folder.
    """
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.utilities import rank_zero_only

    from merge_callback.io import atomic_write_bytes
    from merge_callback.lm import CausalLMModule

    config, run_dir = plan.config, plan.run_dir
    if plan.done is not None:
        say(plan.done)
        return run_dir
    t_start = time.perf_counter() - plan.seconds
    if plan.delete and rank_zero_only.rank == 0:
        for path in plan.delete:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        say(f"--overwrite: deleted {', '.join(p.name for p in plan.delete)} in {run_dir}")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / "config.yaml", dump_config(config).encode("utf-8"))
    facts: dict[str, Any] = {}
    model, tokenizer, data = plan.model, plan.tokenizer, plan.data
    assert data is not None
    base_dir = run_dir / "base_model"
    scratch = config.model == "scratch"
    phases = 2 if scratch and model is None else 1
    phase = 0
    pretrain_seconds = 0.0
    if scratch:
        if model is None:
            phase += 1
            say(f"[{phase}/{phases}] pretraining the base model from scratch: "
                f"{config.scratch_steps} steps at lr {config.scratch_lr:g}, "
                f"{config.scratch_num_layers} layers of width {config.scratch_hidden_size}, "
                f"vocabulary {len(tokenizer)}")
            info = pretrain_base_model(config, base_dir, plan.train_texts, tokenizer=tokenizer,
                                       data=data)
            pretrain_seconds = info["seconds"]
            say(f"      saved {base_dir} ({info['parameters'] / 1e6:.2f}M parameters, final "
                f"training loss {format_value(info['final_train_loss'], 3)}, "
                f"{info['seconds']:.0f} s)")
            with quiet_third_party():  # the continued pretraining loads it like a hub model
                model, tokenizer = load_model_and_tokenizer(base_dir)
            reused = False
        else:
            reused = True
        info_file = base_dir / "pretraining.json"
        info = json.loads(info_file.read_text()) if info_file.is_file() else None
        facts["base model pretraining"] = ("" if info is None else (
            f"{info['steps']} steps from scratch at lr {info['lr']:g}, "
            f"{info['parameters'] / 1e6:.2f}M parameters, vocabulary {info['vocab_size']}, "
            f"final training loss {format_value(info['final_train_loss'])}, "
            f"{info['seconds']:.0f} s")) \
            + (f"{'; ' if info else ''}reused {base_dir}" if reused else "")

    n_params = sum(p.numel() for p in model.parameters())
    facts["model"] = (f"{plan.model_path}" + (f" @ {plan.revision}" if plan.revision else "") +
                      f" ({type(model).__name__}, {n_params / 1e6:.2f}M parameters)")
    s = data.summary()
    facts["data"] = (f"train {s['train_blocks']} blocks, held-out {s['heldout_blocks']}, "
                     f"out-of-domain {s['ood_blocks']}, {s['block_size']} tokens each; "
                     f"evaluations use {_batches_text(config.merge_max_batches, config)} "
                     f"held-out and {_batches_text(config.ood_max_batches, config)} OOD blocks")

    precision = resolved_precision(config)
    model.train()  # from_pretrained returns the model in eval mode
    module = CausalLMModule(model, lr=config.lr, weight_decay=config.weight_decay,
                            warmup_steps=config.warmup_steps, schedule=config.schedule,
                            decay_steps=config.decay_steps, total_steps=config.max_steps)
    ckpt_dir = run_dir / "checkpoints"
    soup_dir = run_dir / "soups"
    checkpoint = ModelCheckpoint(dirpath=str(ckpt_dir), filename="{step}",
                                 every_n_train_steps=config.checkpoint_every, save_top_k=-1)
    merge_cb = BayesMergeCallback(
        heldout=eval_loader(data.heldout, config), metric=config.merge_metric,
        budget=config.merge_budget, alpha=config.merge_alpha, acq_func=config.merge_acq_func,
        strategy=config.merge_strategy, max_batches=config.merge_max_batches, soup_dir=soup_dir,
        seed=config.seed)
    ood_cb = OutOfDomainCallback(merge_cb, eval_loader(data.ood, config)
                                 if data.ood is not None else None, soup_dir,
                                 max_batches=config.ood_max_batches, echo=say)
    callbacks: list[Callback] = [checkpoint, merge_cb, ood_cb]
    if config.keep_checkpoints is not None:
        callbacks.append(KeepNewest(ckpt_dir, "step", ".ckpt", config.keep_checkpoints))
    if config.keep_soups is not None:
        callbacks.append(KeepNewest(soup_dir, "soup-step", ".safetensors", config.keep_soups))
    if config.progress_bar:
        callbacks.append(StepProgressBar("training"))
    phase += 1
    start_step = step_of(plan.resume_from) if plan.resume_from is not None else 0
    say(f"[{phase}/{phases}] " + ("continued pretraining" if scratch else "training") +
        (f" from step {start_step}" if start_step else "") +
        f": {config.max_steps} steps at lr {config.lr:g} ({config.schedule}), a checkpoint and "
        f"a merge round every {config.checkpoint_every} steps (budget {config.merge_budget}, "
        f"λ in [{config.merge_alpha:g}, 1])")
    resume_from = plan.resume_from
    t_fit = time.perf_counter()
    with quiet_third_party():
        loggers = build_loggers(config, run_dir, plan.wandb_id)
        if loggers:
            callbacks.append(LearningRateMonitor(logging_interval="step"))
        L.seed_everything(config.seed, verbose=False)
        trainer = L.Trainer(max_steps=config.max_steps, accelerator=config.accelerator,
                            devices=config.devices, precision=precision, logger=loggers or False,
                            callbacks=callbacks, enable_progress_bar=config.progress_bar,
                            enable_model_summary=False, limit_val_batches=0,
                            num_sanity_val_steps=0, log_every_n_steps=10,
                            accumulate_grad_batches=config.accumulate_grad_batches,
                            gradient_clip_val=config.gradient_clip_val,
                            default_root_dir=str(run_dir))
        # the checkpoint is the recipe's own; it holds tensors and plain Python values only
        trainer.fit(module, train_loader(data.train, config, config.seed),
                    ckpt_path=str(resume_from) if resume_from is not None else None,
                    weights_only=True)
        fit_seconds = time.perf_counter() - t_fit
        wandb_dir = None
        for logger in loggers:
            if type(logger).__name__ == "WandbLogger":
                wandb_dir = logger.experiment.dir
                logger.experiment.finish()
    if not trainer.is_global_zero:
        return run_dir

    say("writing the report")
    rounds = round_records(merge_cb.history, ood_cb.records, soup_dir)
    round_seconds = sum(r.get("seconds", 0.0) for r in rounds if r["step"] > start_step)
    accumulate = (f" x {config.accumulate_grad_batches} accumulated"
                  if config.accumulate_grad_batches > 1 else "")
    warmup = f", warmup {config.warmup_steps}" if config.warmup_steps else ""
    facts["training"] = (f"{config.max_steps} steps, batch {config.batch_size}{accumulate} x "
                         f"{config.block_size} tokens, lr {config.lr:g} ({config.schedule}"
                         f"{warmup}), precision {precision}, "
                         f"{trainer.strategy.root_device.type}")
    acq = f" ({config.merge_acq_func})" if config.merge_strategy == "bayes" else ""
    facts["merging"] = (f"checkpoint every {config.checkpoint_every} steps, search "
                        f"{config.merge_strategy}{acq}, budget {config.merge_budget}, "
                        f"λ in [{config.merge_alpha:g}, 1]")
    if resume_from is not None:
        facts["resumed from"] = str(resume_from)
    if rounds and config.export_final_soup:
        last = rounds[-1]
        soup_file = soup_dir / f"soup-step={last['step']}.safetensors"
        if soup_file.is_file():
            with quiet_third_party():
                export_soup(soup_file, module, tokenizer, run_dir / "final_soup", info=last)
            facts["final soup"] = (f"final_soup/ (step {last['previous_step']}→{last['step']}, "
                                   f"λ = {last['lambda']:.3f}; held-out {config.merge_metric} "
                                   f"{last['value_soup']:.4f} vs latest "
                                   f"{last['value_latest']:.4f})")
    wall = time.perf_counter() - t_start
    timing = (f"{_duration(wall)} in all: reading data {plan.seconds:.0f} s"
              + (f", pretraining {pretrain_seconds:.0f} s" if pretrain_seconds else "")
              + f", training {fit_seconds:.0f} s (of which the λ searches "
              f"{round_seconds:.0f} s)")
    facts["wall time"] = timing
    write_report(run_dir, rounds, config, facts)

    say(f"done: {timing}")
    if rounds:
        sign = 1.0 if config.merge_metric == "accuracy" else -1.0
        wins = sum(1 for r in rounds if sign * (r["value_soup"] - r["value_latest"]) > 0)
        lams = [r["lambda"] for r in rounds]
        plural = "s" if len(rounds) > 1 else ""
        say(f"  {len(rounds)} merge round{plural}: λ {min(lams):.2f}–{max(lams):.2f}; the soup "
            f"beat the latest checkpoint on held-out {config.merge_metric} in {wins} of "
            f"{len(rounds)}")
    say(f"  report: {run_dir / 'report.md'}")
    if (run_dir / "final_soup").is_dir():
        say(f"  final soup: {run_dir / 'final_soup'} (AutoModelForCausalLM.from_pretrained)")
    if wandb_dir is not None and config.wandb_mode != "online" and "offline" in str(wandb_dir):
        say(f"  W&B (offline): upload with `wandb sync {run_dir / 'wandb'}/offline-run-*`")
    total, parts = _folder_bytes(run_dir)
    top = ", ".join(f"{name} {_mb(n)}" for name, n in sorted(parts.items(), key=lambda t: -t[1])
                    if n >= 0.01 * total)
    say(f"  {run_dir} holds {_mb(total)} ({total:,} bytes): {top}")
    return run_dir


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s} s" if m else f"{s} s"


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.0f} kB"


def _folder_bytes(root: Path) -> tuple[int, dict[str, int]]:
    """Bytes of the files under ``root`` (symlinks not followed), in all and per top-level entry."""
    parts: dict[str, int] = {}
    for dirpath, _, files in os.walk(root):
        top = Path(dirpath).relative_to(root).parts
        for name in files:
            try:
                size = os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                continue
            key = top[0] + "/" if top else name
            parts[key] = parts.get(key, 0) + size
    return sum(parts.values()), parts


def _batches_text(max_batches: int | None, config: RecipeConfig) -> str:
    return "all" if max_batches is None else f"up to {max_batches * config.eval_batch_size}"
