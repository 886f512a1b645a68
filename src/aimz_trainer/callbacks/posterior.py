"""Posterior draws from the guide at the end of a fit, and every N epochs if asked."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax

from aimz_trainer._checks import is_int_at_least
from aimz_trainer.callbacks.base import Callback, state_key_of
from aimz_trainer.errors import ConfigurationError
from aimz_trainer.plan import Every

if TYPE_CHECKING:
    from aimz_trainer.callbacks.context import FitContext, FitProgress

__all__ = ["PosteriorSampler"]


class PosteriorSampler(Callback):
    """Draws ``num_samples`` posterior samples from the guide (compiled, in one call).

    The final draws are :attr:`samples`, and ``FitResult.posterior`` when the fit was not
    given ``num_samples`` of its own (``trainer.fit(..., num_samples=n)`` draws the same). With
    ``every_n_epochs``, draws are also taken after every N-th epoch and kept, by epoch, in
    :attr:`history` (on the devices; mind the memory for large models).

    The final draws use the fit's posterior key, so they equal
    ``trainer.sample_posterior(num_samples)`` after the fit; the draws of epoch ``e`` use
    ``jax.random.fold_in`` of that key with ``e + 1``.

    Example:
        >>> sampler = PosteriorSampler(200, every_n_epochs=5)
        >>> sampler.history
        {}
    """

    def __init__(self, num_samples: int, every_n_epochs: int | None = None) -> None:
        if not is_int_at_least(num_samples, 1):
            raise ConfigurationError(f"PosteriorSampler num_samples must be a positive int; got {num_samples!r}.")
        if every_n_epochs is not None and not is_int_at_least(every_n_epochs, 1):
            raise ConfigurationError(
                f"PosteriorSampler every_n_epochs must be a positive int or None; got {every_n_epochs!r}."
            )
        self.num_samples = num_samples
        self.every_n_epochs = every_n_epochs
        self.every = Every(epochs=every_n_epochs)
        self.samples: dict[str, jax.Array] | None = None
        self.history: dict[int, dict[str, jax.Array]] = {}

    @property
    def state_key(self) -> str:
        return state_key_of(self, num_samples=self.num_samples, every_n_epochs=self.every_n_epochs)

    def on_fit_start(self, fit: FitContext, progress: FitProgress) -> None:
        self.samples = None
        self.history = {}

    def on_train_epoch_end(self, fit: FitContext, progress: FitProgress) -> None:
        if self.every.at_epoch_end(progress.epoch + 1):
            key = jax.random.fold_in(fit.posterior_key, progress.epoch + 1)
            self.history[progress.epoch] = fit.sample_posterior(self.num_samples, key)

    def on_fit_end(self, fit: FitContext, progress: FitProgress) -> None:
        self.samples = fit.sample_posterior(self.num_samples)
