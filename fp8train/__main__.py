"""``python -m fp8train``: the same as the ``fp8train`` command (see fp8train/trainer/cli.py)."""

from fp8train.trainer.cli import main

if __name__ == "__main__":
    main()
