"""Facts read before anything runs: this machine (``probe``), what a GGUF file says about its model (``gguf_model``),
the catalog of real models and autotune's cache directory (``catalog``), and synthetic models written for tests and
dry runs (``synth``). May import the vocabulary only; what the engine knows of its own build is handed to the probe
by its caller.
"""
