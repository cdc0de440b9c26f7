"""Recipe settings of the quantization passes (``quantize.ptq`` and ``quantize.qat``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from edgekit.passes import PassConfig


class WeightSettings(PassConfig):
    bits: Literal[4, 8] = Field(8, description="8: int8 per output channel; 4: 4-bit blocks for Linear/Embedding (MatMulNBits), W4A8 grid for Conv")
    group_size: int = Field(32, ge=16, description="4-bit block length along the input dim (a power of two; smaller blocks are used when it does not divide)")
    symmetric: bool = Field(False, description="weight-only blocks (4-bit Linear, embeddings): symmetric (no zero point) or asymmetric (a zero point per block, more accurate); int8 Linear/Conv weights are always symmetric")
    reduce_range: Literal["auto"] | bool = Field(
        "auto", description="int8 weights in -63..63; auto: on x86 CPUs without VNNI, whose u8 x s8 kernels saturate otherwise"
    )
    clip_search: bool = Field(True, description="search a clipping range per channel/block that minimises the input-weighted error")
    gptq: bool = Field(True, description="4-bit Linear weights: GPTQ error compensation with the calibration inputs' Hessian")

    @model_validator(mode="after")
    def _power_of_two(self) -> "WeightSettings":
        if self.group_size & (self.group_size - 1):
            raise ValueError(f"group_size must be a power of two (16, 32, 64, 128, ...), got {self.group_size}")
        return self


class ActivationSettings(PassConfig):
    linear: Literal["dynamic", "static", "none"] = Field(
        "dynamic", description="Linear inputs: dynamic (range per call, the fast path for transformers on CPU), static (calibrated), none (weight-only)"
    )
    granularity: str = Field("per_tensor", description="per_tensor only: integer kernels take one scale per input tensor")
    symmetric: bool = Field(False, description="static inputs: int8 around 0 (whitepaper 3.1.3) instead of uint8 with a zero point")
    calibration: Literal["minmax", "percentile", "mse", "entropy"] = Field("minmax", description="how static input ranges are chosen")
    percentile: float = Field(99.99, gt=50, le=100, description="for calibration: percentile")
    samples: int = Field(64, ge=1, description="calibration samples")
    smooth: float | None = Field(
        0.5, ge=0, le=1, description="Linear layers: SmoothQuant migration strength alpha (input outliers moved into the per-channel weights); null disables"
    )

    @model_validator(mode="after")
    def _per_tensor(self) -> "ActivationSettings":
        if self.granularity != "per_tensor":
            raise ValueError(
                f"granularity {self.granularity!r} is not supported: activations are quantized per tensor, since the "
                "integer kernels of ONNX Runtime and TFLite take one scale per input; set per_tensor"
            )
        return self


class MaxDrop(PassConfig):
    absolute: float | None = Field(None, ge=0, description="largest allowed drop of the eval metric (e.g. 0.01 = 1 point of top-1)")
    relative: float | None = Field(None, ge=0, le=1, description="largest allowed drop as a fraction of the float model's metric")

    @model_validator(mode="after")
    def _one(self) -> "MaxDrop":
        if (self.absolute is None) == (self.relative is None):
            raise ValueError("set exactly one of absolute or relative")
        return self

    def allowed(self, baseline: float) -> float:
        return self.absolute if self.absolute is not None else abs(baseline) * float(self.relative)


class QuantizeSettings(PassConfig):
    backend: Literal["edgekit", "nncf"] = Field("edgekit", description="nncf: NNCF's ONNX post-training quantization on the same data")
    weights: WeightSettings = Field(default_factory=WeightSettings)
    activations: ActivationSettings = Field(default_factory=ActivationSettings)
    embeddings: bool = Field(True, description="quantize embedding tables (weight-only blocks)")
    convolutions: bool = Field(True, description="quantize Conv2d layers (static int8)")
    fold_bn: bool = Field(True, description="fold BatchNorm into the conv/linear before it")
    bias_correction: Literal["auto"] | bool = Field(
        "auto", description="remove the mean output shift caused by weight rounding; auto: convolutions only "
        "(for token models the mean over padded positions is not what real tokens see)"
    )
    skip: list[str] = Field(default_factory=list, description="layer names or glob patterns to keep float")
    latency_aware: bool = Field(True, description="time each layer float vs integer on ONNX Runtime and keep float where integer is slower")
    latency_threads: int = Field(0, ge=0, description="threads for the layer timings (0: all cores)")
    latency_margin: float = Field(1.0, ge=1, description="a block goes back to float when float is clearly faster (in most timing rounds) by this factor")
    sensitivity: bool = Field(True, description="per-layer sensitivity table (one layer quantized at a time; needs an eval split)")
    max_drop: MaxDrop | None = Field(None, description="accuracy budget on the eval split; layers go back to higher precision until it holds")
    size_budget: float | None = Field(None, gt=0, le=1, description="largest size as a fraction of the float model; 8-bit layers drop to 4-bit (least sensitive first) until it holds")
