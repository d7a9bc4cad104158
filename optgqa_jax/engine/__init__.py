"""The serving engine: host-side block manager and scheduler, device-side pool and steps."""

from optgqa_jax.engine.block_manager import BlockPool, KVCacheManager, block_hashes
from optgqa_jax.engine.config import EngineConfig, SamplingParams
from optgqa_jax.engine.engine import Completion, Engine, EngineStats
from optgqa_jax.engine.runner import KVPool, ModelRunner, page_bytes
from optgqa_jax.engine.scheduler import Request, Scheduler

__all__ = ["BlockPool", "KVCacheManager", "block_hashes", "EngineConfig", "SamplingParams",
           "Completion", "Engine", "EngineStats", "KVPool", "ModelRunner", "page_bytes", "Request",
           "Scheduler"]
