"""Hydra configuration tree, shipped inside the wheel as ``fp8train.configs``."""
