"""ragctl: a query-adaptive RAG controller in front of a vLLM engine.

The data path is retrieve -> (profile -> rules) -> schedule -> synthesis -> engine; see
`ragctl.controller` for the one place that awaits, `ragctl.policy` for what it decides, and
`ragctl.types` for the records it passes.

    import ragctl
    with ragctl.open("squad") as ctl:
        print(ctl.ask("Where was Super Bowl 50 played?").text)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# Registers the built-in synthesis methods (ragctl.synthesis.registry): importing any part of
# ragctl runs this first, so every Config knows them.
import ragctl.synthesis.registry  # noqa: F401

__version__ = "0.1.0"
__all__ = ["Answer", "Config", "Controller", "Decision", "Message", "Settings", "aopen", "open"]

if TYPE_CHECKING:
    from ragctl.controller import Controller
    from ragctl.service import aopen, open
    from ragctl.settings import Settings
    from ragctl.types import Answer, Config, Decision, Message

_LAZY = {
    "Controller": "ragctl.controller",
    "Settings": "ragctl.settings",
    "open": "ragctl.service",
    "aopen": "ragctl.service",
    "Answer": "ragctl.types",
    "Config": "ragctl.types",
    "Decision": "ragctl.types",
    "Message": "ragctl.types",
}


def __getattr__(name: str) -> Any:
    # Lazy, so `import ragctl` (and the CLI's start) stays cheap.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ragctl' has no attribute {name!r}")
