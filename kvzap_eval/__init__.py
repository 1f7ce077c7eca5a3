"""kvzap-eval: KVzap KV-cache pruning on Hugging Face transformers, with a cache that frees what it evicts."""

from .methods import METHODS, Method, MethodConfig, build_method
from .runtime import KVzapSession, compress

__all__ = ["METHODS", "KVzapSession", "Method", "MethodConfig", "build_method", "compress"]
__version__ = "0.1.0"
