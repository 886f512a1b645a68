"""The reference library's ``aimz.model`` names, for code that imports them from there:
``from aimz_trainer.model import ImpactModel, KernelSpec``."""

from aimz_trainer.impact_model import ImpactModel
from aimz_trainer.kernel_spec import KernelSpec

__all__ = ["ImpactModel", "KernelSpec"]
