"""fp8train: distributed FP8 mixed-precision training for PyTorch.

Importing this package changes nothing in torch.
"""

from fp8train.cast import Fp8CastStats, cast_to_fp8, quantization_stats
from fp8train.config import Fp8Config
from fp8train.convert import convert_to_fp8, is_fp8_eligible
from fp8train.formats import E4M3, E5M2, FP8_DTYPES, FP8_FORMATS, Fp8Format, as_fp8_format, format_by_name
from fp8train.gemm import fp8_mm
from fp8train.linear import Fp8Linear
from fp8train.scaling import amax_to_log2_scale, amax_to_scale, tensor_to_amax
from fp8train.scaling_state import ScalingState
from fp8train.te import convert_to_te
from fp8train.tensor import Fp8Tensor, dequantize, quantize

__version__ = "0.1.0"

__all__ = [
    # formats
    "E4M3",
    "E5M2",
    "FP8_DTYPES",
    "FP8_FORMATS",
    "Fp8Format",
    "as_fp8_format",
    "format_by_name",
    # scaling and casting
    "Fp8CastStats",
    "Fp8Tensor",
    "ScalingState",
    "amax_to_log2_scale",
    "amax_to_scale",
    "cast_to_fp8",
    "dequantize",
    "quantization_stats",
    "quantize",
    "tensor_to_amax",
    # layers and conversion
    "Fp8Config",
    "Fp8Linear",
    "convert_to_fp8",
    "convert_to_te",
    "fp8_mm",
    "is_fp8_eligible",
]
