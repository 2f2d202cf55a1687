"""``train.compile``: torch.compile each transformer block, in place.

Per block, not the whole model: every block of a model shares one compiled graph (the blocks differ
only in their parameters and buffers, which the graph takes as inputs), so compile time does not grow
with depth, and the loop, the strategy's communication hooks and the loss stay eager. Each block is
compiled with ``fullgraph=True``: a graph break inside a block is an error, not a silent slowdown.

In place (``nn.Module.compile``): the module tree and the ``state_dict`` keys are unchanged, so
checkpoints, resume and the FP8 monitor see the same names with and without compilation, and the
FP8 scaling state (updated inside the compiled graphs, backward included) is saved as usual.
"""

from __future__ import annotations

from torch import nn

from fp8train.errors import ConfigError

__all__ = ["compile_blocks", "transformer_blocks"]


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of ``model``: the entries of its outermost ``nn.ModuleList``s (GPT's
    ``h``, Llama's ``layers``, an HF model's ``model.layers``), in order."""
    blocks: list[nn.Module] = []
    found: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and not any(name.startswith(f"{outer}.") for outer in found):
            found.append(name)
            blocks.extend(module)
    return blocks


def compile_blocks(model: nn.Module) -> int:
    """Compile every block of ``model`` in place (``fullgraph=True``); returns how many."""
    blocks = transformer_blocks(model)
    if not blocks:
        raise ConfigError(f"train.compile=true compiles the model's transformer blocks, but "
                          f"{type(model).__name__} has no nn.ModuleList of blocks; allowed: train.compile=false")
    for block in blocks:
        block.compile(fullgraph=True)
    return len(blocks)
