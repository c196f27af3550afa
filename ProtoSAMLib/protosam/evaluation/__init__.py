"""Evaluation, demo and pictures for the ProtoSAM engine.

* :mod:`.protocol` - the SSL-ALPNet / ProtoSAM one-shot rules (folds, 3-part support slices).
* :mod:`.metrics` - 2-D (per slice) and 3-D (per scan) Dice, false positives outside a structure.
* :mod:`.datasets` - NIfTI image + label per scan, Synapse / CHAOS label maps.
* :mod:`.abdominal`, :mod:`.realistic`, :mod:`.polyp` - the protocols; :mod:`.runner` drives them.
* :mod:`.report` - CSV / JSON / text table; :mod:`.pictures` - overlay montage and Dice plot.
* :mod:`.sample_data`, :mod:`.pseudo_scans`, :mod:`.demo` - Colin27 + AAL sample data and the demo.
* the ``evaluate`` and ``demo`` commands are :mod:`protosam.cli.evaluate`.
"""
