"""Scheduling policy: the KV memory model (`memory`), the best-fit choice of a configuration
(`bestfit`, pure) and the admission queue that reserves KV blocks for admitted plans
(`admission`, asyncio, no I/O of its own)."""

from ragctl.scheduler.admission import Admission, AdmissionQueue, KVLedger, Reservation
from ragctl.scheduler.bestfit import choose, fallback_configs, unshown_reserved
from ragctl.scheduler.memory import NeedTable, blocks_for, config_need

__all__ = [
    "Admission",
    "AdmissionQueue",
    "KVLedger",
    "NeedTable",
    "Reservation",
    "blocks_for",
    "choose",
    "config_need",
    "fallback_configs",
    "unshown_reserved",
]
