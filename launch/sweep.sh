#!/usr/bin/env bash
# A Hydra multirun: one training run per precision preset, one after another in this process. Arguments
# are more overrides, and more sweeps (`a=x,y` runs every combination).
#
#   launch/sweep.sh                                          # 4 runs of the default model, 300 steps each
#   launch/sweep.sh experiment=smoke                         # 4 runs of 20 steps, seconds each on CPU
#   launch/sweep.sh train.steps=1000 optim.lr=1e-3,3e-3      # 8 runs
#   launch/sweep.sh hydra.sweep.dir=multirun/precision-ablation
#
# Where outputs go (configs/config.yaml): each run's directory is hydra.sweep.dir/hydra.sweep.subdir =
# multirun/<overrides of that run>, e.g. multirun/experiment=smoke,precision=fp8_o2, relative to the current
# directory. The name holds no timestamp, so running the sweep again resumes every run from its latest
# checkpoint (resume=auto) and skips finished ones; settings that do not change what a run computes
# (resume, logging.*, monitor.*, launcher.timeout_s, ...: exclude_keys in configs/config.yaml) are left
# out of the name. Each run dir has metrics.jsonl (fp8train.trainer.run_log.read_metrics),
# config.yaml and checkpoints/; multirun/multirun.yaml records the sweep. With logging=wandb_offline the
# runs also land in <run dir>/wandb for `wandb sync`.
#
# Variables:
#   FP8TRAIN  the trainer command; default `fp8train` (e.g. "python -m fp8train")
#
# Multi-process sweeps: every rank runs the whole sweep in the same order and the process group is kept
# from one run to the next, so torchrun works too:
#   FP8TRAIN="torchrun --standalone --nproc-per-node=2 -m fp8train" launch/sweep.sh experiment=smoke
set -euo pipefail

read -r -a fp8train <<< "${FP8TRAIN:-fp8train}"

exec "${fp8train[@]}" -m precision=fp32,bf16,fp8_o1,fp8_o2 "$@"
