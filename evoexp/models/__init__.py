from evoexp.models.adapter import DecoderAdapter, LinearInfo
from evoexp.models.applier import Applier, OwnedTensors
from evoexp.models.loading import LoadedModel, load_model, native_bf16, resolve_device, resolve_dtype

__all__ = ["Applier", "DecoderAdapter", "LinearInfo", "LoadedModel", "OwnedTensors", "load_model", "native_bf16",
           "resolve_device", "resolve_dtype"]
