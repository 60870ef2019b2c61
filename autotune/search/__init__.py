"""The search for the best settings: which values each knob may take on this machine (``space``), the Optuna study that
measures them (``study``), the recommendation the spread of repeated runs supports (``recommend``), the engine
self-check that finds the runtime switch a crashing model needs (``health``), and ``pipeline.tune``, the one path
from a model file to a tuned config. May import the vocabulary, the facts, the memory model and the engine.
"""
