"""vitlab.quant: post-training fake quantisation of ViTs, shared by the quantisation chapter's lessons.

    quantizer.py   FakeQuantizer: one quantisation point (uniform / log2 / shift_log2), observe + calibrate
    calibrate.py   parameters from sample values: min-max, percentile, MSE search, log2, SULQ search
    model.py       QuantLinear, QuantConv2d, QuantAttention, quantize_model, calibrate_model, set_quant_state
    report.py      model size, average weight bits, BOPs, a per-layer table

    from vitlab.quant import quantize_model, calibrate_model
    qmodel = calibrate_model(quantize_model(model, w_bits=4, a_bits=4), calib_images, method="mse")

Every quantised forward goes through vitlab.kernels.fake_quant (Triton on CUDA, the reference on CPU).
"""
from .calibrate import (ETAS, log2_params, minmax_params, mse_params, percentile_params, range_params,
                        shift_log2_params)
from .model import (QuantAttention, QuantConv2d, QuantLinear, calibrate_model, float_state_dict, quant_layers,
                    quantize_model, quantizers, set_quant_state)
from .quantizer import METHODS, MODES, FakeQuantizer
from .report import average_weight_bits, bops, model_size_bits, quant_report

__all__ = ["FakeQuantizer", "MODES", "METHODS", "ETAS", "range_params", "minmax_params", "percentile_params",
           "mse_params", "log2_params", "shift_log2_params", "QuantLinear", "QuantConv2d", "QuantAttention",
           "quantize_model", "calibrate_model", "quant_layers", "quantizers", "set_quant_state",
           "float_state_dict", "model_size_bits", "average_weight_bits", "bops", "quant_report"]
