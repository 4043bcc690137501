"""mplus: a thin, fast M+ / MemoryLLM model on Llama built on the kernels of `mplus_kernels`.

Importing it registers the model with transformers' Auto classes (``model_type: "mplus"``): ``AutoConfig`` and
``AutoModelForCausalLM.from_pretrained`` build an :class:`MPlusForCausalLM` from a checkpoint that
``save_pretrained`` wrote, and ``pipeline("text-generation", model=...)`` takes one.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

from transformers import AutoConfig, AutoModelForCausalLM

from .attention import FusedLlamaAttention, FusedMemoryAttention, KVCache, MemoryKV
from .base import load_tokenizer
from .config import MPlusConfig
from .memory import DroppedRows, ShortTermMemory
from .memory.ltm import LongTermMemory, LTMBudgetError
from .memory.state import MemoryState
from .memory.transfer import TransferEngine
from .model import MPlusCache, MPlusForCausalLM, StaleCacheError
from .segments import MemorySegments, PendingSegment

try:  # one version: setup.py's, as the installed package metadata carries it
    __version__ = _version("mplus")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

AutoConfig.register(MPlusConfig.model_type, MPlusConfig, exist_ok=True)
AutoModelForCausalLM.register(MPlusConfig, MPlusForCausalLM, exist_ok=True)

__all__ = [
    "DroppedRows",
    "FusedLlamaAttention",
    "FusedMemoryAttention",
    "KVCache",
    "LTMBudgetError",
    "LongTermMemory",
    "MPlusCache",
    "MemoryState",
    "MPlusConfig",
    "MPlusForCausalLM",
    "MemoryKV",
    "MemorySegments",
    "PendingSegment",
    "ShortTermMemory",
    "StaleCacheError",
    "TransferEngine",
    "load_tokenizer",
]
