"""``train(cfg)``: one training run, from a typed ``TrainConfig`` (no Hydra needed).

    fp8train                                       # GPT on the bundled corpus, FP8 (fp8_o2), CPU is fine
    torchrun --nproc-per-node=4 -m fp8train precision=fp8_o3
    torchrun --nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=$HEAD:29500 -m fp8train

From Python: ``train(TrainConfig(...))`` or ``train(train_config_from_mapping({...}))``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from fp8train._atomic import atomic_write_text
from fp8train.errors import ConfigError
from fp8train.trainer.build import build_model, count_parameters
from fp8train.trainer.checkpoint import load_checkpoint, resolve_resume, saved_config
from fp8train.trainer.compile import compile_blocks
from fp8train.trainer.config import TrainConfig, train_config_to_mapping
from fp8train.trainer.data import WindowSampler, check_micro_batch, load_token_data, prepare_token_file
from fp8train.trainer.distributed import DistEnv, agree, broadcast_object, distributed_session
from fp8train.trainer.faults import Faults
from fp8train.trainer.fp8_stats_hook import Fp8StatsHook
from fp8train.trainer.loop import LoopState, run_loop
from fp8train.trainer.precision import apply_precision
from fp8train.trainer.resume import abandon_tag, check_resume_config, set_aside_later_checkpoints
from fp8train.trainer.run_log import RunLog, check_wandb_login
from fp8train.trainer.strategy import build_strategy

__all__ = ["TrainResult", "check_zero_world_size", "train"]


@dataclass(frozen=True, slots=True)
class TrainResult:
    run_dir: Path
    step: int
    train_loss: float | None
    val_loss: float | None
    skipped_steps: int


def _prepare(cfg: TrainConfig, env: DistEnv, run_dir: Path) -> Path | None:
    """Rank 0 validates the run directory and prepares the data; the others learn the outcome
    (an error on rank 0 stops every rank, before anything is written to run_dir)."""
    result: object = None
    if env.is_main:
        try:
            prepare_token_file(cfg.data)
            check_wandb_login(cfg.logging)  # logging.wandb=online without credentials: before any write
            result = resolve_resume(cfg.resume, run_dir)
            if result is not None:  # another model, precision, optimizer, data: refused before any write
                check_resume_config(saved_config(result), cfg, result)
        except Exception as e:  # re-raised on every rank below
            result = e
    result = broadcast_object(result, env.device)
    if isinstance(result, Exception):
        raise result
    return result


def _set_aside_abandoned(run_dir: Path, step: int, env: DistEnv, run_log: RunLog) -> None:
    """Rank 0 moves what lies beyond ``step`` (checkpoints, metrics records) aside, nothing deleted.
    Called once nothing can refuse the run any more: the CLI removes what a refused run created."""
    ok, lines = False, []
    try:
        tag = abandon_tag(step)
        if env.is_main and (moved := set_aside_later_checkpoints(run_dir, step, tag)) is not None:
            lines.append(f"checkpoints of steps after {step} (an abandoned trajectory) moved to {moved}")
        if (aside := run_log.open_metrics(tag)) is not None:
            lines.append(f"metrics.jsonl records of steps after {step} moved to {aside}")
        ok = True
    finally:
        agree(ok, "setting aside checkpoints and metrics of later steps", env.device)
    for line in lines:
        run_log.print(line)


def check_zero_world_size(strategy: str, *, n_tensors: int, world_size: int) -> None:
    """Whole-tensor ZeRO gives each trainable tensor to one rank: with more ranks than tensors some
    would own nothing (idle optimizer, no memory saved), a mis-sized job rather than a useful one."""
    if strategy in ("zero1", "zero2") and world_size > n_tensors:
        raise ConfigError(f"parallel={strategy} on {world_size} processes but the model has {n_tensors} trainable "
                          f"tensors: whole-tensor ZeRO would leave {world_size - n_tensors} rank(s) owning nothing; "
                          f"allowed: at most {n_tensors} processes, or parallel=ddp")


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or continue, see ``TrainConfig.resume``) the training described by ``cfg``."""
    run_dir = Path(cfg.run_dir)
    with distributed_session(cfg.launcher) as env:
        resume_from = _prepare(cfg, env, run_dir)
        data = load_token_data(cfg.data, seq_len=cfg.block_size, vocab_size=cfg.vocab_size)
        check_micro_batch(data, seq_len=cfg.block_size, micro_batch_size=cfg.train.micro_batch_size,
                          world_size=env.world_size)
        model = build_model(cfg.model, seed=cfg.seed, device=env.device)
        forward_ctx = apply_precision(model, cfg.precision, env.device)  # a context factory
        n_compiled = compile_blocks(model) if cfg.train.compile else 0
        check_zero_world_size(cfg.strategy, n_tensors=sum(p.requires_grad for p in model.parameters()),
                              world_size=env.world_size)
        strategy = build_strategy(model, cfg, env)
        state, position, wandb_id = LoopState(), 0, None
        if resume_from is not None:
            saved = load_checkpoint(resume_from, strategy=strategy, model=model, env=env)
            state = LoopState(step=saved["step"], skipped_steps=saved["skipped_steps"], tokens_seen=saved["tokens_seen"])
            position, wandb_id = saved["data_position"], saved.get("wandb_id")
        sampler = WindowSampler(data.train, seq_len=cfg.block_size, seed=cfg.seed, position=position)
        plain = train_config_to_mapping(cfg)
        if env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(plain, sort_keys=False))
        agree(True, "run directory", env.device)
        run_log_ok = False
        try:  # rank 0 starts wandb; should that fail, every rank stops here rather than wait for it
            run_log = RunLog(cfg.logging, run_dir=run_dir, run_name=cfg.name, config=plain, is_main=env.is_main,
                              start_step=state.step, total_steps=cfg.train.steps, wandb_id=wandb_id)
            run_log_ok = True
        finally:
            agree(run_log_ok, "starting the run log (wandb)", env.device)
        try:
            run_log.print(f"{cfg.name}: {cfg.model.arch} {count_parameters(model) / 1e6:.2f} M params | precision "
                          f"{cfg.precision.name} | {cfg.strategy} on {env.world_size} x {env.device.type} | data "
                          f"{data.source} ({len(data.train) / 1e6:.2f} M train tokens) | run_dir {run_dir}"
                          + (f" | {n_compiled} blocks compiled" if n_compiled else ""))
            if resume_from is not None:
                run_log.print(f"resumed from {resume_from} at step {state.step}")
            _set_aside_abandoned(run_dir, state.step, env, run_log)
            if state.step >= cfg.train.steps:
                run_log.print(f"nothing to do: the run is at step {state.step} of train.steps={cfg.train.steps}")

            def trainer_state(s: LoopState) -> dict[str, object]:
                return {"data_position": sampler.position, "skipped_steps": s.skipped_steps,
                        "tokens_seen": s.tokens_seen, "world_size": env.world_size,
                        "wandb_id": run_log.wandb_id, "config": plain}

            # the loop's step hooks, in the order they run at each point
            hooks = [Faults(cfg.faults, env.rank, resumed=state.step > 0, model=model),
                     Fp8StatsHook(cfg.monitor.every, model, strategy)]
            state = run_loop(cfg, model=model, strategy=strategy, sampler=sampler, val_tokens=data.val, env=env,
                             run_log=run_log, state=state, run_dir=run_dir, forward_ctx_factory=forward_ctx,
                             trainer_state=trainer_state, hooks=hooks)
            if cfg.monitor.plots and env.is_main:
                from fp8train.trainer.plots import write_run_plots  # matplotlib: only when plotting

                run_log.print(f"plots: {', '.join(p.name for p in write_run_plots([run_dir]))} in {run_dir / 'plots'}")
        finally:
            run_log.close()
    return TrainResult(run_dir=run_dir, step=state.step, train_loss=state.last_train_loss,
                       val_loss=state.last_val_loss, skipped_steps=state.skipped_steps)
