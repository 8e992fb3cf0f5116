"""Quantization math (seeds 000, 001 and 004): linear quantization per tensor, channel or group with
bit packing; two-level (VS-Quant) and multi-level scales; k-means codebooks; activation range
observers; and LLM.int8() matrix multiplication with outlier decomposition.

    >>> q = quantize(w, 4, scheme="symmetric", granularity="group", group_size=128)
    >>> w_hat = q.dequantize(); q.bits_per_element
"""

from autopar.quant.int8 import MAX_INNER, int8_matmul, int_matmul, outlier_columns, vectorwise_int8_matmul
from autopar.quant.kmeans import KMeansTensor, kmeans_quantize
from autopar.quant.linear import QuantizedTensor, integer_range, linear_qparams, quantize
from autopar.quant.multilevel import (MultiLevelTensor, ScaleLevel, multilevel_bits_per_element,
                                      quantize_multilevel, quantize_two_level)
from autopar.quant.observers import CalibrationObserver, MinMaxObserver, MovingAverageObserver
from autopar.quant.packing import pack_bits, packed_nbytes, unpack_bits
from autopar.quant.modules import (SCHEMES, QuantizedLinear, Scheme, bits_per_weight, get_scheme,
                                   quantize_model, quantized_bytes, replaced_linears)
from autopar.quant.bits import (BitPlan, LayerSensitivity, assign_bits, hessian_trace, layer_bytes,
                               plan_bits, quantization_error, sensitivity)

__all__ = ["MAX_INNER", "CalibrationObserver", "KMeansTensor", "MinMaxObserver", "MovingAverageObserver",
           "MultiLevelTensor", "QuantizedTensor", "ScaleLevel", "int8_matmul", "int_matmul", "integer_range",
           "kmeans_quantize", "linear_qparams", "multilevel_bits_per_element", "outlier_columns", "pack_bits",
           "packed_nbytes", "quantize", "quantize_multilevel", "quantize_two_level", "unpack_bits",
           "vectorwise_int8_matmul",
           "BitPlan", "LayerSensitivity", "assign_bits", "hessian_trace", "layer_bytes", "plan_bits",
           "quantization_error", "sensitivity",
           "SCHEMES", "QuantizedLinear", "Scheme", "bits_per_weight", "get_scheme", "quantize_model",
           "quantized_bytes", "replaced_linears"]
