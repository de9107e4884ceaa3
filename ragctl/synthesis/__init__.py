"""Synthesis: turn retrieved chunks into an answer with one of the registered methods
(`registry`: map_rerank, stuff, map_reduce, each in its own module). Planning and combining are
pure (`methods.Synthesizer`); the controller runs the calls."""

from ragctl.synthesis.methods import CallEstimate, Step, Synthesizer

__all__ = ["CallEstimate", "Step", "Synthesizer"]
