"""The reference library's ``aimz.utils.data`` names, for code that imports them from there:
``from aimz_trainer.utils.data import ArrayDataset, ArrayLoader``."""

from aimz_trainer.array_data import ArrayDataset, ArrayLoader

__all__ = ["ArrayDataset", "ArrayLoader"]
