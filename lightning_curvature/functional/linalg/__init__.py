"""Matrix-free linear algebra over any symmetric ``matvec``.

Lanczos, trace estimators, and the reductions and random draws of the long vectors they
work on (sharded ones too).
"""
