"""The headless trainer: data, Real-ESRGAN degradation, methods (D3SR, TAD-SR, TSD-SR, OSEDiff VSD), export.

It imports ``d3sr_core`` and writes the checkpoints that ``d3sr_core.checkpoints`` reads; the core never imports it.
"""
