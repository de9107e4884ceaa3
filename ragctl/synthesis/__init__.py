"""Synthesis: turn retrieved chunks into an answer with map_rerank, stuff or map_reduce.
Planning and combining are pure (`methods.Synthesizer`); the controller runs the calls."""

from ragctl.synthesis.methods import CallEstimate, Step, Synthesizer

__all__ = ["CallEstimate", "Step", "Synthesizer"]
