"""ragctl: a query-adaptive RAG controller in front of a vLLM engine.

The data path is retrieve -> (profile -> rules) -> schedule -> synthesis -> engine; see
`ragctl.controller` for the one place that awaits, and `ragctl.types` for the records it passes.
"""

__version__ = "0.1.0"
