"""The DALI data path: the train and eval graphs (``graphs``), the picklable per-batch
source they read (``source``) and the loader that turns their outputs into Batches
(``loader``; entry point ``build_dali_loader``, called by ``ocr.data.backends``).

Importing this package does not import DALI; ``graphs`` and ``loader`` do.
"""
