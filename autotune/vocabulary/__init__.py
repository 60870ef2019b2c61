"""The words every layer speaks: the knob table (``knobs``: each engine setting's type, default and spellings), the
``Settings`` value built from it (``settings``), llama.cpp's command-line spelling of those settings (``flags``),
the metrics table (``metrics``: each measured figure's unit and direction) and the errors a user can act on
(``errors``). The bottom layer: it imports nothing of autotune's but itself.
"""
