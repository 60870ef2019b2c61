"""The search for the best settings: which values each knob may take on this machine (``space``), the Optuna study that
measures them (by job: ``storage``, ``request``, ``baselines``, ``kvgate``, ``guard``, the trial ``loop``, and
``study``, which creates or resumes one), the recommendation the spread of repeated runs supports (``recommend``),
the engine self-check that finds the runtime switch a crashing model needs (``health``), the memory model checked
against the engine (``oracle``), and ``pipeline.tune``, the one path from a model file to a tuned config. May import
the vocabulary, the facts, the memory model and the engine.
"""
