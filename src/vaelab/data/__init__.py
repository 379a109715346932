"""Data sources (MNIST, IDX folders, .npz, image folders), checksums, cache and binarization.

>>> from vaelab.data import load, info
>>> info(load("mnist"))["train"]
60000
"""

from vaelab.data.binarize import TEST_BINARIZE_SEED, binarize, static_binarize
from vaelab.data.dataset import Dataset
from vaelab.data.sources import fetch, info, load
from vaelab.errors import DataError

__all__ = [
    "Dataset",
    "load",
    "fetch",
    "info",
    "binarize",
    "static_binarize",
    "TEST_BINARIZE_SEED",
    "DataError",
]
