"""FakeQuantizer: one quantise-dequantise point in a network, with its calibration state.

    q = FakeQuantizer(bits=4, mode="uniform", axis=-1)   # per channel along the last axis
    q.observing = True;  model(calib_images)               # forward records values, returns x unchanged
    q.calibrate("mse")                                     # scale / zero_point from what was recorded
    q.observing = False; y = q(x)                          # y = fake_quant(x, scale, zero_point, 4, axis=-1)

Modes (exact grids in vitlab.kernels.fake_quant, which every forward goes through: Triton on CUDA):

    uniform     x_hat = (clamp(rint(x / s) + z, 0, 2^b - 1) - z) * s     (symmetric: z = 2^(b-1))
    log2        x_hat = s * 2^-rint(-log2(x / s)),  0 below the last level
    shift_log2  x_hat = 2^(-s * rint(-log2(x + eta) / s)) - eta           (I&S-ViT's SULQ)

State: buffers ``scale``, ``zero_point`` (int32, uniform) and ``eta`` (shift_log2) go in the state dict;
they are empty until calibrated (``calibrated`` is False), and loading a state dict resizes them, so a
calibrated quantiser saves and loads like any module. ``enabled`` False makes the quantiser the
identity; an enabled, uncalibrated one raises. Changing ``bits`` clears the parameters (they were for
the old grid) but keeps the observations, so ``q.bits = 3; q.calibrate()`` re-fits cheaply.

Observation memory is bounded: exact running min/max per channel, plus a uniform random sample of at
most ``max_samples`` values (bottom-k of random keys: every value seen has the same chance to stay).
"""
from __future__ import annotations

import numbers

import torch
import torch.nn as nn

from vitlab.kernels import fake_quant as _fq  # module, not function: tests may patch its dispatch
from . import calibrate as C

__all__ = ["FakeQuantizer", "MODES", "METHODS"]

MODES = ("uniform", "log2", "shift_log2")
METHODS = {"uniform": ("minmax", "percentile", "mse"), "log2": ("log2",), "shift_log2": ("shift_log2",)}


class FakeQuantizer(nn.Module):
    """Fake quantisation of the tensors passing through, per tensor (``axis=None``) or per channel.

    bits: 2..8. mode: "uniform" | "log2" | "shift_log2". axis: channel axis (negative counts from the
    end, so -1 serves [B, N, C] activations of any B and N). symmetric: signed grid (uniform only).
    method: the default for ``calibrate()`` (uniform: "minmax" | "percentile" | "mse"; the log modes
    have one each). max_samples: cap on the values kept while observing.
    """

    def __init__(self, bits: int = 8, mode: str = "uniform", axis: int | None = None, symmetric: bool = False,
                 method: str | None = None, max_samples: int = 2 ** 18):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"FakeQuantizer: mode must be one of {MODES}, got {mode!r}")
        if axis is not None and (isinstance(axis, bool) or not isinstance(axis, numbers.Integral)):
            raise TypeError(f"FakeQuantizer: axis must be None or an int, got {axis!r}")
        if not isinstance(symmetric, bool):
            raise TypeError(f"FakeQuantizer: symmetric must be a bool, got {symmetric!r}")
        if symmetric and mode != "uniform":
            raise ValueError(f"FakeQuantizer: symmetric=True applies to mode 'uniform' only, got mode {mode!r}")
        if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
            raise ValueError(f"FakeQuantizer: max_samples must be a positive int, got {max_samples!r}")
        self.mode, self.axis, self.symmetric, self.max_samples = mode, axis, symmetric, max_samples
        self.method = METHODS[mode][0] if method is None else self._check_method(method)
        self.enabled = True
        self.observing = False
        self.register_buffer("scale", torch.empty(0))
        self.register_buffer("zero_point", torch.empty(0, dtype=torch.int32))
        self.register_buffer("eta", torch.empty(0))
        self._bits = 8
        self.bits = bits
        self.reset_observations()

    # ---------------------------------------------------------------------------------- configuration
    @property
    def bits(self) -> int:
        return self._bits

    @bits.setter
    def bits(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 2 <= value <= 8:
            raise ValueError(f"FakeQuantizer: bits must be an int in [2, 8], got {value!r}")
        if int(value) != self._bits:
            self.clear_params()  # parameters of another grid would be silently wrong
        self._bits = int(value)

    @property
    def calibrated(self) -> bool:
        return self.scale.numel() > 0

    def _check_method(self, method) -> str:
        if method not in METHODS[self.mode]:
            raise ValueError(f"FakeQuantizer: method {method!r} does not apply to mode {self.mode!r}; "
                             f"expected one of {METHODS[self.mode]}")
        return method

    def clear_params(self) -> None:
        """Forget scale / zero point / eta (``calibrated`` becomes False)."""
        dev = self.scale.device
        self.scale = torch.empty(0, device=dev)
        self.zero_point = torch.empty(0, dtype=torch.int32, device=dev)
        self.eta = torch.empty(0, device=dev)

    def set_params(self, scale, zero_point=None, eta=None) -> None:
        """Set the parameters directly (methods that compute their own). Shapes: [] or [1] per tensor,
        [C] per channel; zero_point integer, for uniform only; eta > 0 for shift_log2 only."""
        scale = self._as_param("scale", scale, torch.float32)
        if not bool((scale > 0).all()):
            raise ValueError(f"FakeQuantizer.set_params: scale must be > 0, got {scale}")
        if self.mode == "uniform":
            if zero_point is None:
                raise ValueError("FakeQuantizer.set_params: mode 'uniform' needs a zero_point")
            if isinstance(zero_point, torch.Tensor) and zero_point.is_floating_point() and \
                    not bool((zero_point == zero_point.round()).all()):
                raise ValueError(f"FakeQuantizer.set_params: zero_point must hold integers, got {zero_point}")
            zero_point = self._as_param("zero_point", zero_point, torch.int32)
            qmax = 2 ** self.bits - 1
            if zero_point.shape != scale.shape or not bool(((zero_point >= 0) & (zero_point <= qmax)).all()):
                raise ValueError(f"FakeQuantizer.set_params: zero_point must match scale's shape "
                                 f"{tuple(scale.shape)} and lie in [0, {qmax}], got {zero_point}")
        elif zero_point is not None:
            raise ValueError(f"FakeQuantizer.set_params: mode {self.mode!r} uses no zero_point, got {zero_point!r}")
        if self.mode == "shift_log2":
            if eta is None:
                raise ValueError("FakeQuantizer.set_params: mode 'shift_log2' needs eta (> 0)")
            eta = self._as_param("eta", eta, torch.float32)
            if eta.shape != scale.shape or not bool((eta > 0).all()):
                raise ValueError(f"FakeQuantizer.set_params: eta must match scale's shape {tuple(scale.shape)} "
                                 f"and be > 0, got {eta}")
        elif eta is not None:
            raise ValueError(f"FakeQuantizer.set_params: eta is for mode 'shift_log2' only (mode {self.mode!r})")
        dev = self.scale.device
        self.scale = scale.to(dev)
        self.zero_point = (zero_point if zero_point is not None else torch.empty(0, dtype=torch.int32)).to(dev)
        self.eta = (eta if eta is not None else torch.empty(0)).to(dev)

    def _as_param(self, name, v, dtype) -> torch.Tensor:
        if isinstance(v, bool) or not isinstance(v, (numbers.Real, torch.Tensor)):
            raise TypeError(f"FakeQuantizer.set_params: {name} must be a number or a tensor, got {type(v).__name__}")
        t = torch.as_tensor(v).detach().reshape(-1).to(dtype)
        if self.axis is None and t.numel() != 1:
            raise ValueError(f"FakeQuantizer.set_params: {name} must have 1 element per tensor (axis None), "
                             f"got shape {tuple(torch.as_tensor(v).shape)}")
        return t

    # ---------------------------------------------------------------------------------- observation
    def reset_observations(self) -> None:
        self._min = self._max = None  # exact running range per channel [C]
        self._sample = self._keys = None  # kept columns [C, k] and their random keys [k]
        self._gen = None

    @property
    def observed(self) -> bool:
        return self._min is not None

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Record x's range and a bounded random sample of its values (per channel along ``axis``)."""
        axis = None if self.axis is None else self._axis_of(x)
        m = C.channels_first(x, axis)
        if self._min is not None and self._min.shape[0] != m.shape[0]:
            raise ValueError(f"FakeQuantizer.observe: x has {m.shape[0]} channels along axis {self.axis}, "
                             f"earlier inputs had {self._min.shape[0]}")
        lo, hi = m.amin(1), m.amax(1)
        self._min = lo if self._min is None else torch.minimum(self._min, lo)
        self._max = hi if self._max is None else torch.maximum(self._max, hi)
        if self._gen is None:  # fixed seed: the same calibration images give the same parameters
            self._gen = torch.Generator(device=m.device).manual_seed(0)
        keys = torch.rand(m.shape[1], generator=self._gen, device=m.device)
        if self._sample is not None:
            m, keys = torch.cat([self._sample, m], 1), torch.cat([self._keys, keys])
        cap = max(1, self.max_samples // m.shape[0])
        if m.shape[1] > cap:  # bottom-k of uniform keys = a uniform sample of everything seen
            idx = keys.topk(cap, largest=False).indices
            m, keys = m[:, idx], keys[idx]
        self._sample, self._keys = m, keys

    def _axis_of(self, x: torch.Tensor) -> int:
        if not -x.ndim <= self.axis < x.ndim:
            raise ValueError(f"FakeQuantizer: axis {self.axis} is out of range for x of shape {tuple(x.shape)}")
        return self.axis % x.ndim

    # ---------------------------------------------------------------------------------- calibration
    @torch.no_grad()
    def calibrate(self, method: str | None = None, x: torch.Tensor | None = None, **kw) -> "FakeQuantizer":
        """Set the parameters with ``method`` (default ``self.method``) from ``x`` if given (weights),
        else from what ``observe`` recorded. ``kw`` go to the calibrate.py function (q=, grid=, etas=, p=).
        Min-max from observations uses the exact running range, not the sample."""
        method = self.method if method is None else self._check_method(method)
        if x is not None:
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"FakeQuantizer.calibrate: x must be a tensor or None, got {type(x).__name__}")
            axis, data = (None if self.axis is None else self._axis_of(x)), x.detach()
        elif not self.observed:
            raise RuntimeError("FakeQuantizer.calibrate: nothing observed; set observing=True and run "
                               "calibration data through the model first, or pass x=")
        else:  # the sample is already channels-first [C, k]
            axis, data = (None if self.axis is None else 0), self._sample
        sym = {"symmetric": self.symmetric}
        if method == "minmax":
            if x is None:
                s, z = C.range_params(self._min, self._max, self.bits, self.symmetric, **kw)
                s, z = (s.reshape(()), z.reshape(())) if self.axis is None else (s, z)
            else:
                s, z = C.minmax_params(data, self.bits, axis, **sym, **kw)
            self.set_params(s, z)
        elif method == "percentile":
            self.set_params(*C.percentile_params(data, self.bits, axis, **sym, **kw))
        elif method == "mse":
            self.set_params(*C.mse_params(data, self.bits, axis, **sym, **kw))
        elif method == "log2":
            self.set_params(*C.log2_params(data, self.bits, axis, **kw))
        else:
            self.set_params(*C.shift_log2_params(data, self.bits, axis, **kw))
        return self

    # ---------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.observe(x)
            return x
        if not self.enabled:
            return x
        if not self.calibrated:
            raise RuntimeError(f"FakeQuantizer ({self.mode}, {self.bits} bits) is enabled but not calibrated: "
                               f"call calibrate() (after observing data), set_params(), or disable it")
        axis = None if self.axis is None else self._axis_of(x)
        if axis is not None and x.shape[axis] != self.scale.numel():
            raise ValueError(f"FakeQuantizer: x has {x.shape[axis]} channels along axis {self.axis}, "
                             f"the parameters have {self.scale.numel()}")
        zp = self.zero_point if self.mode == "uniform" else None
        eta = self.eta if self.mode == "shift_log2" else None
        return _fq.fake_quant(x, self.scale, zp, self.bits, axis=axis, mode=self.mode, eta=eta)

    # ---------------------------------------------------------------------------------- state dict
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        keys = [prefix + n for n in ("scale", "zero_point", "eta")]
        if not any(k in state_dict for k in keys):
            return  # a float model's state dict: keep our calibration, report nothing missing
        for name, k in zip(("scale", "zero_point", "eta"), keys):
            if k in state_dict:  # buffers start empty: take the saved shape
                setattr(self, name, torch.empty_like(state_dict[k], device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        where = "per tensor" if self.axis is None else f"axis={self.axis}"
        state = "calibrated" if self.calibrated else "uncalibrated"
        return (f"{self.mode}, bits={self.bits}, {where}{', symmetric' if self.symmetric else ''}, {state}"
                f"{'' if self.enabled else ', disabled'}")
