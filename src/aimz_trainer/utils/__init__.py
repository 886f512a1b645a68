"""The reference library's ``aimz.utils`` names (see :mod:`aimz_trainer.utils.data`)."""
