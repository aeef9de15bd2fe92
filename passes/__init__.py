"""edgeq's graph passes, one per module. See :mod:`edgeq.pass_base` for the pass contract and registry."""
