"""ImpactModel(kernel, rng_key, inference, param_input=, param_output=) and its read-only
properties, as in aimz 0.17.0 (measured side by side)."""

from __future__ import annotations

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
from optax import adam

from aimz_trainer import AimzWarning, ImpactModel, KernelValidationError
from aimz_trainer.errors import ConfigurationError
from tests.aimz_api.conftest import model, new_model, svi


def _model_of(kernel) -> ImpactModel:
    return ImpactModel(
        kernel, rng_key=jax.random.key(0), inference=SVI(kernel, AutoNormal(kernel), adam(0.1), Trace_ELBO())
    )


def test_properties_return_what_was_given():
    inference = svi()
    im = ImpactModel(model, rng_key=jax.random.key(3), inference=inference)
    assert im.kernel is model and im.inference is inference
    assert (im.param_input, im.param_output) == ("X", "y")
    np.testing.assert_array_equal(jax.random.key_data(im.rng_key), jax.random.key_data(jax.random.key(3)))
    assert im.kernel_spec is None and im.posterior is None and im.vi_result is None and not im.is_fitted()
    for name in ("kernel", "inference", "param_input", "param_output", "rng_key", "kernel_spec"):
        with pytest.raises(AttributeError):
            setattr(im, name, None)


def test_a_legacy_uint32_key_is_converted_with_an_aimz_warning():
    with pytest.warns(AimzWarning, match="legacy uint32 key"):
        im = new_model(jax.random.PRNGKey(3))
    assert jax.dtypes.issubdtype(im.rng_key.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(im.rng_key), jax.random.key_data(jax.random.key(3)))


def test_mcmc_is_accepted_and_anything_else_is_a_type_error():
    assert isinstance(
        ImpactModel(
            model, rng_key=jax.random.key(0), inference=MCMC(NUTS(model), num_warmup=1, num_samples=1)
        ).inference,
        MCMC,
    )
    with pytest.raises(TypeError, match="inference must be a numpyro.infer.SVI or numpyro.infer.MCMC.*got str"):
        ImpactModel(model, rng_key=jax.random.key(0), inference="svi")
    with pytest.raises(ConfigurationError, match=r"rng_key must be one key, jax.random.key\(seed\); got 7"):
        ImpactModel(model, rng_key=7, inference=svi())


def _varargs(X, y=None, *rest): ...
def _varkw(X, y=None, **extra): ...
def _positional(X, /, y=None): ...
def _no_output(X, z=None): ...
def _input_default(X=1.0, y=None): ...
def _output_default(X, y=0.0): ...


@pytest.mark.parametrize(
    ("kernel", "message"),
    [
        (_varargs, r"must not take variable arguments .*\['rest'\]"),
        (_varkw, r"must not take variable arguments .*\['extra'\]"),
        (_positional, r"positional-only parameters \(\['X'\]\)"),
        (_no_output, r"must take 'y' \(param_output\); its parameters are \['X', 'z'\]"),
        (_input_default, r"input parameter 'X' must not have a default"),
        (_output_default, r"output parameter 'y' must default to None"),
    ],
)
def test_kernel_signatures_aimz_refuses_are_kernel_validation_errors(kernel, message):
    with pytest.raises(KernelValidationError, match=message):
        _model_of(kernel)


def _unnamed_output(X, y=None):
    w = numpyro.sample("w", dist.Normal())
    numpyro.sample("z", dist.Normal(w * X, 1.0), obs=y)


def _unobserved_output(X, y=None):
    w = numpyro.sample("w", dist.Normal())
    numpyro.sample("y", dist.Normal(w * X, 1.0))


def _reserved_site(X, y=None):
    chain = numpyro.sample("chain", dist.Normal())
    numpyro.sample("y", dist.Normal(chain * X, 1.0), obs=y)


def _slash_site(X, y=None):
    w = numpyro.sample("a/w", dist.Normal())
    numpyro.sample("y", dist.Normal(w * X, 1.0), obs=y)


@pytest.mark.parametrize(
    ("kernel", "message"),
    [
        (_unnamed_output, "no sample or deterministic site named 'y'"),
        (_unobserved_output, "output site 'y' must be observed"),
        (_reserved_site, r"\['chain'\] are dimensions of every output tree"),
        (_slash_site, r"must not hold '/'.*\['a/w'\]"),
    ],
)
def test_kernel_bodies_aimz_refuses_fail_the_fit_before_training(kernel, message):
    X = np.linspace(-1, 1, 20, dtype=np.float32)
    im = _model_of(kernel)
    with pytest.raises(KernelValidationError, match=message):
        im.fit(X, 2 * X, progress=False, num_samples=2)
    assert im.vi_result is None and not im.is_fitted()


def test_str_and_repr_describe_the_model(fitted):
    im, _ = fitted
    assert str(im).splitlines()[:6] == [
        "<ImpactModel>", "Kernel: model", "Inference method: SVI", "Input parameter: 'X'", "Output parameter: 'y'",
        "Fitted: True",
    ]  # fmt: skip
    assert repr(im).startswith("<ImpactModel kernel_name=model; rng_key_data=[")
    assert "kernel_spec=KernelSpec(traced=True, sample_sites=('w', 'tau', 't', 'y')" in repr(im)
