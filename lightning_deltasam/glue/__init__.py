"""The GLUE training app (``train.py``, ``conf/``): one module per config group it serves.

``tasks`` (task group), ``data`` (data), ``models`` (model: encoders), ``classifier`` (classifier: the
LightningModule), ``app`` (builds them from the config, trains, reports). The library
(:mod:`lightning_deltasam`) never imports this package.
"""
