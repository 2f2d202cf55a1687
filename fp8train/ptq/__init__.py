"""fp8train.ptq: FP8 post-training quantization of a trained model, and the study that sweeps it.

``quantize_for_inference`` converts a high-precision model's linear layers to FP8 for inference
(``recipe="amax"``: a just-in-time scale per tensor; ``"cscale"``: one constant scaling bias);
``fp8train-eval RUN_DIR`` (``fp8train.ptq.study``) evaluates a trained run as trained and quantized.
Arrows point from here to the library and the trainer (to read a run), never back.
"""

from fp8train.ptq.quantize import (
    PTQ_RECIPES,
    Fp8CastTally,
    RoleTally,
    evaluate_lm,
    next_token_accuracy,
    quantize_for_inference,
    track_fp8_casts,
)

__all__ = [
    # quantization
    "PTQ_RECIPES",
    "quantize_for_inference",
    # metrics
    "Fp8CastTally",
    "RoleTally",
    "evaluate_lm",
    "next_token_accuracy",
    "track_fp8_casts",
]
