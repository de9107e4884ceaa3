"""Scheduling policy: the KV memory model (`memory`), the best-fit choice of a configuration
(`bestfit`, pure) and the admission queue that reserves KV blocks for admitted plans
(`admission`, asyncio, no I/O of its own), and the SLO loop (`slo`: stage-time prediction,
flagging, priority, paused admissions and planning within a deadline)."""

from ragctl.scheduler.admission import Admission, AdmissionQueue, KVLedger, Reservation
from ragctl.scheduler.bestfit import choose, fallback_configs, unshown_reserved
from ragctl.scheduler.memory import NeedTable, blocks_for, config_need
from ragctl.scheduler.slo import Mitigation, SLOTracker, StageStats, choose_within_slo

__all__ = [
    "Admission",
    "AdmissionQueue",
    "KVLedger",
    "Mitigation",
    "NeedTable",
    "Reservation",
    "SLOTracker",
    "StageStats",
    "blocks_for",
    "choose",
    "choose_within_slo",
    "config_need",
    "fallback_configs",
    "unshown_reserved",
]
