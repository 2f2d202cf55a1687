"""fp8train.comm: FP8 gradient all-reduce with a globally-synced scale and whole-tensor ZeRO, on
stock torch.distributed collectives. Installed as ``fp8train.comm``; never import it as a
top-level ``comm`` (that name belongs to Jupyter)."""

__all__: list[str] = []
