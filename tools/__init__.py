"""Tools of this repository that drive a checkout (``make gpu-check``); not part of the mplus package or its wheel.

A regular package (not a namespace one) so that ``python3 -m tools.<name>`` from the repository root finds this
folder even where the interpreter has another package named ``tools``.
"""
