"""JAI: a small Korean job-postings GPT and its serving engine (plain PyTorch, no TorchServe)."""

from .checkpoint import CheckpointError, file_sha256, load_model, load_tokenizer
from .detokenizer import IncrementalDetokenizer
from .engine import Completion, Engine, Limits, StepOutput, resolve_device
from .model import GPT, GPTConfig, KVCache
from .sampling import ParameterError, SamplingParams

__all__ = [
    "CheckpointError",
    "Completion",
    "Engine",
    "GPT",
    "GPTConfig",
    "IncrementalDetokenizer",
    "KVCache",
    "Limits",
    "ParameterError",
    "SamplingParams",
    "StepOutput",
    "file_sha256",
    "load_model",
    "load_tokenizer",
    "resolve_device",
]
