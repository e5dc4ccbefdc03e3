"""The native engine's continuous-batching scheduler and paged KV block manager (plain Python)."""

from server.scheduler.kv_cache import KVCacheManager
from server.scheduler.request import Request, RequestStatus, SamplingParams
from server.scheduler.scheduler import ScheduledRequest, Scheduler, SchedulerOutput

__all__ = [
    "KVCacheManager",
    "Request",
    "RequestStatus",
    "SamplingParams",
    "ScheduledRequest",
    "Scheduler",
    "SchedulerOutput",
]
