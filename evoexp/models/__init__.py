from evoexp.models.adapter import DecoderAdapter, LinearInfo
from evoexp.models.loading import LoadedModel, load_model, resolve_device

__all__ = ["DecoderAdapter", "LinearInfo", "LoadedModel", "load_model", "resolve_device"]
