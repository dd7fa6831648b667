"""The IR layer: safe loading and saving, torch.export tracing, FX -> ONNX lowering, weight
sites and block discovery, on both IR kinds."""

from effc.ir.model import FxModel, InputSpec, OnnxModel

__all__ = ["FxModel", "InputSpec", "OnnxModel"]
