"""`natural_gradient`: routing of q(theta) parameters to SGD, the rest to `other`."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from numpyro.infer import SVI, Trace_ELBO

from numpyro_svae.optim import QTHETA_PREFIX, natural_gradient


def _params():
    return {f"{QTHETA_PREFIX}niw.m": jnp.ones(2), "encoder$params": {"w": jnp.ones(3)}}


def test_natural_gradient_routes_qtheta_to_sgd_matches_manual_rules():
    opt = natural_gradient(natgrad_lr=0.5, other=optax.sgd(0.1))
    p = _params()
    g = jax.tree.map(jnp.ones_like, p)
    upd, _ = opt.update(g, opt.init(p), p)
    np.testing.assert_allclose(upd[f"{QTHETA_PREFIX}niw.m"], -0.5)
    np.testing.assert_allclose(upd["encoder$params"]["w"], -0.1)
    # adam on the others: first step is -lr * sign(g); the q(theta) step stays plain SGD
    opt = natural_gradient(natgrad_lr=2.0, other=optax.adam(1e-3))
    upd, _ = opt.update(jax.tree.map(lambda a: 3.0 * a, g), opt.init(p), p)
    np.testing.assert_allclose(upd[f"{QTHETA_PREFIX}niw.m"], -6.0)
    np.testing.assert_allclose(upd["encoder$params"]["w"], -1e-3, rtol=1e-4)


def test_natural_gradient_schedule_matches_schedule_values():
    sched = optax.linear_schedule(1.0, 0.0, 4)
    opt = natural_gradient(schedule=sched)
    p = {f"{QTHETA_PREFIX}a": jnp.zeros(1)}
    state = opt.init(p)
    for step in range(3):
        upd, state = opt.update({f"{QTHETA_PREFIX}a": jnp.ones(1)}, state, p)
        np.testing.assert_allclose(upd[f"{QTHETA_PREFIX}a"], -sched(step))


def test_natural_gradient_errors_name_both_sides():
    with pytest.raises(ValueError, match="exactly one"):
        natural_gradient()
    with pytest.raises(ValueError, match="exactly one"):
        natural_gradient(natgrad_lr=1.0, schedule=optax.constant_schedule(1.0))
    with pytest.raises(ValueError, match="natgrad_lr"):
        natural_gradient(natgrad_lr=-1.0)
    with pytest.raises(TypeError, match="other"):
        natural_gradient(natgrad_lr=1.0, other=lambda g: g)
    opt = natural_gradient(natgrad_lr=1.0, prefix="qq$")
    with pytest.raises(ValueError, match=r"qq\$.*encoder\$params"):
        opt.init(_params())


def test_natural_gradient_accepted_by_svi(key):
    def model():
        numpyro.sample("y", dist.Normal(0.0, 1.0), obs=1.0)

    def guide():
        numpyro.param(f"{QTHETA_PREFIX}m", jnp.zeros(()))
        numpyro.param("net", jnp.zeros(()))

    svi = SVI(model, guide, natural_gradient(natgrad_lr=0.1, other=optax.adam(1e-2)),
              loss=Trace_ELBO())
    res = svi.run(key, 3, progress_bar=False)
    assert set(res.params) == {f"{QTHETA_PREFIX}m", "net"}
