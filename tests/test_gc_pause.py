"""gc_paused: the cyclic collector held off while a fit's programs are traced, and back on after,
whatever the nesting or the threads; a collector the user turned off stays off."""

from __future__ import annotations

import gc
import threading

import jax
import pytest

import aimz_trainer.compile as compile_module
from aimz_trainer import Trainer
from aimz_trainer.compile import FitPrograms
from aimz_trainer.gc_pause import gc_paused

from .conftest import linear_data, linear_svi


@pytest.fixture(autouse=True)
def collector_on():
    assert gc.isenabled()
    yield
    gc.enable()


def test_nested_blocks_turn_the_collector_back_on_when_the_outermost_ends():
    with gc_paused():
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()


def test_overlapping_blocks_on_two_threads_leave_it_on_after_the_last():
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    states = {}

    def first():
        with gc_paused():
            first_in.set()
            second_in.wait()
        states["after_first"] = gc.isenabled()  # the second thread's block is still open
        first_out.set()

    def second():
        first_in.wait()
        with gc_paused():
            second_in.set()
            first_out.wait()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert states == {"after_first": False}
    assert gc.isenabled()


def test_a_collector_the_user_turned_off_stays_off():
    gc.disable()
    with gc_paused():
        pass
    assert not gc.isenabled()


def test_it_comes_back_on_after_an_exception():
    with pytest.raises(RuntimeError), gc_paused():
        raise RuntimeError("a failed trace")
    assert gc.isenabled()


def test_a_fit_traces_its_programs_and_draws_with_the_collector_off_and_turns_it_back_on(monkeypatch):
    seen = []
    lower = FitPrograms.lower

    def spy(self, *args, **kwargs):
        seen.append(gc.isenabled())
        return lower(self, *args, **kwargs)

    def sampler_spy(*args, **kwargs):
        sampler = make_sampler(*args, **kwargs)

        def traced(*inputs):
            seen.append(("draws", gc.isenabled()))
            return sampler(*inputs)

        return traced

    make_sampler = compile_module.make_posterior_sampler
    monkeypatch.setattr(FitPrograms, "lower", spy)
    monkeypatch.setattr(compile_module, "make_posterior_sampler", sampler_spy)
    data = linear_data(200)
    trainer = Trainer(max_epochs=1, rng_key=jax.random.key(0), enable_progress_bar=False)
    result = trainer.fit(linear_svi(200), data, batch_size=50, num_samples=4)
    assert result.posterior["b"].shape == (4,)
    assert seen == [False, ("draws", False)]
    assert gc.isenabled()
