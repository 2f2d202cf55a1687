"""fp8train.optim: precision-decoupled AdamW (FP8 first moment, FP16 second moment, scaled master
weights). Installed as ``fp8train.optim``; never import it as a top-level ``optim``."""

__all__: list[str] = []
