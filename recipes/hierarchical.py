"""Multilevel impact modelling: a campaign's effect region by region, with a latent per customer.

Simulated data: customers (the rows) live in ``G`` regions of unequal sizes (the groups, ``g``
the region of each row). Each customer has covariates ``x`` and a spending level of their own,
``u ~ Normal(0, s_u)``, which persists from week to week. Their spend in ``K`` weeks before a
campaign is ``y_pre = a[g] + x @ beta + u + Normal(0, sigma)`` (one column per week); a random
half of them then get the campaign, ``t ~ Bernoulli(0.5)``, and their spend in the campaign week
is ``y = a[g] + x @ beta + u + b[g] * t + Normal(0, sigma)``. Regions differ in their spending
level ``a[g]`` and in their campaign effect ``b[g]``, drawn around population means:
``a ~ Normal(mu_a, s_a)``, ``b ~ Normal(mu_b, s_b)`` (standardized, so that the simulated regions
have exactly the population's mean and spread: the checks against ``mu_b`` then test the fit,
not the luck of ``G`` draws).

The NumPyro model has all three levels: population parameters; a ``plate("groups", G)`` (not
subsampled) with each region's ``a`` and ``b``, indexed by the rows' integer region ids; and the
minibatch ``plate("data", n, subsample_size=len(x))`` with a local latent ``u``, one per
customer. The :class:`Trainer` gives each batch's dataset row indices to that plate, so the
AutoNormal guide's ``u_auto_loc`` (one entry per customer) is updated with that customer's own
rows. The number of regions and of weeks are static model arguments: ``SVI(..., num_groups=G,
pre_periods=K)`` for the fit, ``Predictor(..., static_kwargs=...)`` for the predictions. The
treatment ``t`` is a sample site of its own, so ``numpyro.handlers.do`` can set it: one
:class:`Predictor` draws the campaign week for every customer with the campaign
(``intervention={"t": ones}``) and without it (``{"t": zeros}``), each customer's ``u`` drawn
from the fitted guide (``in_sample=True``, the training rows in their order), with the same
random numbers in both worlds, and :func:`estimate_effect` turns the difference into the
average effect over these customers with a 94% credible interval.

What it checks against the simulation: the regions' fitted effects correlate with the true ones;
the interval of the population effect ``mu_b`` (what a new region could expect) covers the true
``mu_b``; the average effect over these customers (their regions' effects, so weighted by the
regions' sizes: not ``mu_b``) lies in its interval; the customers' fitted ``u`` correlate with
the true ones, which they do only if every batch trained the guide's entries of its own rows.

Why the weeks before the campaign: without them, ``u`` and the noise would be confounded (only
``s_u^2 + sigma^2`` is identified), and the mean-field guide, which treats each customer's ``u``
and their region's effect as independent although the campaign week's spend ties them, would
report intervals of the region effects about half as wide as the exact ones. ``K`` weeks pin
each ``u`` down and shrink that understatement to a factor of about
``sqrt(1 - 1/(K + 1 + sigma^2/s_u^2))``: 0.95 at the default ``K = 8`` (the exact 94% interval
would be 5% wider).

Run it with ``aimz-trainer fit --recipe hierarchical`` (20,000 customers in 40 regions: about
40 s on 2 CPU cores, most of it start-up and compiling: the 1,000 steps take a few seconds); the
two prediction stores go to ``RUN_DIR/predictions``, beside the run's config, logs and
checkpoints. The number of regions and of weeks are the recipe's settings
(``--model.num_groups``, ``--model.pre_periods``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpyro.distributions as dist
import optax
from jax.typing import ArrayLike
from numpyro import plate, sample
from numpyro.infer import SVI, Trace_ELBO, init_to_mean
from numpyro.infer.autoguide import AutoNormal

from aimz_trainer import Predictor, estimate_effect
from aimz_trainer.recipe import Experiment, FitOutcome, Recipe, RecipeContext

TRUE_MU_A, TRUE_SD_A = 2.0, 1.0  # the regions' spending levels
TRUE_MU_B, TRUE_SD_B = 1.0, 0.5  # the regions' campaign effects: the population effect and its spread
TRUE_BETA = (0.8, -0.5)  # covariates -> spend
TRUE_SD_U = 1.0  # the customers' own spending levels
TRUE_SIGMA = 1.0  # week-to-week noise
TREATED_SHARE = 0.5  # the campaign reaches a random half of the customers
INTERVAL = 0.94


def _standardized(values: np.ndarray) -> np.ndarray:
    return (values - values.mean()) / values.std()


def make_data(
    num_rows: int, num_groups: int, pre_periods: int, seed: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(data, truth)``: the model's inputs (``x``, ``g``, ``t``, ``y_pre`` with one column per
    week before the campaign, ``y``; float32, ``g`` int32) and the simulated latents (``a`` and
    ``b`` per region, ``u`` per customer; float64)."""
    if num_groups < 2:
        raise ValueError(f"num_groups must be at least 2 (a population of regions); got {num_groups}.")
    rng = np.random.default_rng(seed)
    a = TRUE_MU_A + TRUE_SD_A * _standardized(rng.normal(size=num_groups))
    b = TRUE_MU_B + TRUE_SD_B * _standardized(rng.normal(size=num_groups))
    sizes = rng.lognormal(0.0, 0.5, size=num_groups)  # regions of unequal sizes
    g = rng.choice(num_groups, size=num_rows, p=sizes / sizes.sum())
    x = rng.normal(size=(num_rows, len(TRUE_BETA)))
    u = TRUE_SD_U * rng.normal(size=num_rows)
    t = (rng.uniform(size=num_rows) < TREATED_SHARE).astype(np.float64)
    level = a[g] + x @ np.asarray(TRUE_BETA) + u
    y_pre = level[:, None] + TRUE_SIGMA * rng.normal(size=(num_rows, pre_periods))
    y = level + b[g] * t + TRUE_SIGMA * rng.normal(size=num_rows)
    data = {
        "x": x.astype(np.float32),
        "g": g.astype(np.int32),
        "t": t.astype(np.float32),
        "y_pre": y_pre.astype(np.float32),
        "y": y.astype(np.float32),
    }
    return data, {"a": a, "b": b, "u": u}


def true_average_effect(data: dict[str, np.ndarray], truth: dict[str, np.ndarray]) -> float:
    """The campaign's average effect over these customers: their regions' effects, averaged."""
    return float(np.mean(truth["b"][data["g"]]))


def make_model(num_rows: int) -> Callable[..., None]:
    """Population -> regions -> customers; ``t`` is a sample site, so it can be intervened on.
    ``num_groups`` and ``pre_periods`` are static keyword arguments (not rows of the data)."""

    def model(
        x: ArrayLike,
        g: ArrayLike,
        t: ArrayLike,
        *,
        y_pre: ArrayLike | None = None,
        y: ArrayLike | None = None,
        num_groups: int,
        pre_periods: int,
    ) -> None:
        mu_a = sample("mu_a", dist.Normal(0.0, 5.0))
        sd_a = sample("sd_a", dist.HalfNormal(2.5))
        mu_b = sample("mu_b", dist.Normal(0.0, 2.5))
        sd_b = sample("sd_b", dist.HalfNormal(2.5))
        beta = sample("beta", dist.Normal(0.0, 2.5).expand([len(TRUE_BETA)]).to_event(1))
        sd_u = sample("sd_u", dist.HalfNormal(2.5))
        sigma = sample("sigma", dist.HalfNormal(2.5))
        treated_logit = sample("treated_logit", dist.Normal(0.0, 1.5))
        with plate("groups", num_groups):  # every region in every step: not subsampled
            a = sample("a", dist.Normal(mu_a, sd_a))
            b = sample("b", dist.Normal(mu_b, sd_b))
        with plate("data", size=num_rows, subsample_size=len(x)):
            u = sample("u", dist.Normal(0.0, sd_u))  # local: one per customer, the batch's ones
            # Under handlers.do(model, {"t": value}) this returns the value instead of t.
            treated = sample("t", dist.Bernoulli(logits=treated_logit), obs=t)
            level = a[g] + x @ beta + u
            before = dist.Normal(level[:, None], sigma).expand([len(x), pre_periods]).to_event(1)
            sample("y_pre", before, obs=y_pre)
            sample("y", dist.Normal(level + b[g] * treated, sigma), obs=y)

    return model


def make_svi(model: Callable[..., None], total_steps: int, learning_rate: float, **static_kwargs: int) -> SVI:
    """Mean-field Gaussian guide (one loc and scale per customer for ``u``); Adam with a cosine
    decay over the whole fit; the static model arguments bound to the SVI."""
    # init_to_mean: the scales start at their prior means, not at a random draw's median.
    guide = AutoNormal(model, init_loc_fn=init_to_mean)
    schedule = optax.cosine_decay_schedule(learning_rate, decay_steps=total_steps, alpha=0.01)
    return SVI(model, guide, optax.adam(schedule), Trace_ELBO(), **static_kwargs)


def central_interval(draws: ArrayLike, ci: float = INTERVAL) -> tuple[float, float]:
    low, high = np.quantile(np.asarray(draws, np.float64), [(1 - ci) / 2, (1 + ci) / 2])
    return float(low), float(high)


@dataclass
class Settings:
    """The simulated customers and the optimizer.

    Args:
        num_rows: customers (rows) of simulated data.
        num_groups: regions (groups).
        pre_periods: weeks observed before the campaign.
        learning_rate: Adam's initial learning rate (decayed to 1% of it over the fit).
    """

    num_rows: int = 20_000
    num_groups: int = 40
    pre_periods: int = 8
    learning_rate: float = 0.05


def setup(settings: Settings, context: RecipeContext) -> Experiment:
    """The simulation (from the run's seed) and the SVI, the static model arguments bound to it."""
    data, truth = make_data(settings.num_rows, settings.num_groups, settings.pre_periods, context.seed)
    static = {"num_groups": settings.num_groups, "pre_periods": settings.pre_periods}
    steps_per_epoch = math.ceil(settings.num_rows / context.batch_size)
    total_steps = min(
        context.max_epochs * steps_per_epoch if context.max_epochs else math.inf,
        context.max_steps or math.inf,
    )
    svi = make_svi(make_model(settings.num_rows), int(total_steps), settings.learning_rate, **static)
    return Experiment(svi=svi, train_data=data, extras={"truth": truth})


def report(settings: Settings, outcome: FitOutcome) -> dict[str, Any]:
    """The campaign week with and without the campaign for every customer, the average effect
    from the two stores, and the fit checked against the simulation."""
    data, truth = outcome.experiment.train_data, outcome.experiment.extras["truth"]
    svi, result, trainer = outcome.experiment.svi, outcome.result, outcome.trainer
    static = dict(svi.static_kwargs)
    model = svi.model
    num_samples = next(iter(result.posterior.values())).shape[0]
    # Draws of the global sites (population and regions); the customers' u stay in the guide.
    posterior = {name: np.asarray(value, np.float64) for name, value in result.posterior.items()}
    group_effects = posterior["b"].mean(axis=0)
    row_latents = np.asarray(result.params["u_auto_loc"], np.float64)

    # One Predictor for both worlds: the same rng_key, hence the same noise and the same draws
    # of each customer's u in both. The treatment values are given row by row, so both worlds
    # run one compiled function (a constant value would be compiled into it).
    predictor = Predictor(
        model,
        result.posterior,
        guide=svi.guide,
        params=result.params,
        mesh=trainer.mesh,
        rng_key=outcome.predict_key,
        static_kwargs=static,
    )
    started = time.perf_counter()
    # The campaign week of the fit's customers, in their order (in sample: each one's u from the
    # guide); its observed spend goes to the stores' observed_data, beside the predictions.
    week = {key: data[key] for key in ("x", "g", "t", "y")}
    nobody, everybody = np.zeros_like(data["t"]), np.ones_like(data["t"])
    untreated, treated = (
        predictor.predict(
            week, intervention={"t": value}, return_sites=["y"], in_sample=True, output_dir=outcome.predictions_dir
        )
        for value in (nobody, everybody)
    )
    effect = estimate_effect(untreated, treated, "y", ci=INTERVAL).summary
    predict_wall = time.perf_counter() - started

    attrs = effect.attrs
    true_effect = true_average_effect(data, truth)
    mu_b_low, mu_b_high = central_interval(posterior["mu_b"])
    summary = {
        "rows": settings.num_rows,
        "groups": settings.num_groups,
        "pre_periods": settings.pre_periods,
        "treated_share": float(data["t"].mean()),
        "true_effect": true_effect,
        "average_effect": attrs["average_effect_mean"],
        "ci": attrs["ci"],
        "ci_low": attrs["ci_low"],
        "ci_high": attrs["ci_high"],
        "covers_true_effect": bool(attrs["ci_low"] <= true_effect <= attrs["ci_high"]),
        "true_population_effect": TRUE_MU_B,
        "population_effect": float(posterior["mu_b"].mean()),
        "population_ci_low": mu_b_low,
        "population_ci_high": mu_b_high,
        "covers_population_effect": bool(mu_b_low <= TRUE_MU_B <= mu_b_high),
        "group_effect_corr": float(np.corrcoef(group_effects, truth["b"])[0, 1]),
        "group_effect_rmse": float(np.sqrt(np.mean((group_effects - truth["b"]) ** 2))),
        "group_level_corr": float(np.corrcoef(posterior["a"].mean(axis=0), truth["a"])[0, 1]),
        "row_latent_corr": float(np.corrcoef(row_latents, truth["u"])[0, 1]),
        "final_loss": float(result.losses[-1]),
        "predict_wall_s": predict_wall,
        "untreated_store": untreated.attrs["store_path"],
        "treated_store": treated.attrs["store_path"],
    }
    summary["store"] = str(outcome.predictions_dir)
    print(
        f"hierarchical: {settings.num_rows:,} customers in {settings.num_groups} regions, {settings.pre_periods} weeks "
        f"before the campaign, {summary['treated_share']:.1%} treated, {trainer.mesh.size} device(s)"
    )
    print(
        f"fit: {result.losses.size} steps, final loss {summary['final_loss']:,.1f}; "
        f"{num_samples} draws x 2 interventions predicted in {predict_wall:.2f} s"
    )
    print(
        f"region effects:              correlation {summary['group_effect_corr']:.3f} with the truth, "
        f"RMSE {summary['group_effect_rmse']:.3f} (their spread: {TRUE_SD_B:.3f})"
    )
    print(
        f"customer latents u:          correlation {summary['row_latent_corr']:.3f} of the fitted means with the truth"
    )
    print(
        f"population effect mu_b:      {summary['population_effect']:+.3f}, {INTERVAL:.0%} interval "
        f"[{mu_b_low:+.3f}, {mu_b_high:+.3f}], true {TRUE_MU_B:+.3f} "
        f"({'inside' if summary['covers_population_effect'] else 'OUTSIDE'})"
    )
    print(
        f"estimated average effect:    {summary['average_effect']:+.3f}, "
        f"{attrs['ci']:.0%} interval [{summary['ci_low']:+.3f}, {summary['ci_high']:+.3f}]"
    )
    print(
        f"true effect:                 {true_effect:+.3f} "
        f"({'inside' if summary['covers_true_effect'] else 'OUTSIDE'} the interval)"
    )
    print(f"stores in {outcome.predictions_dir}:")
    print(f"  t = 0: {summary['untreated_store']}")
    print(f"  t = 1: {summary['treated_store']}")
    return summary


RECIPE = Recipe(
    settings=Settings,
    setup=setup,
    trainer={"max_epochs": 50},
    fit={"batch_size": 1000, "num_samples": 200},
    checkpoint={"every_n_epochs": 10},
    report=report,
)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``aimz-trainer fit --recipe hierarchical`` with the options ``argv``; returns the summary."""
    return RECIPE.main(argv)


if __name__ == "__main__":
    main()
