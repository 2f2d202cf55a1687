"""``python -m fp8train``: until the trainer lands, runs the FP8-vs-fp32 demo (fp8train.demo)."""

from fp8train.demo import main

main()
