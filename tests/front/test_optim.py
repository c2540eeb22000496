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


class _DoublingGuide:
    """Stands in for SVAEGuide: `retract` doubles the q(theta) updates and records what it got."""

    natural_gradients = True

    def __init__(self):
        self.seen = []

    def retract(self, params, updates):
        # masked-out entries (optax.MaskedNode) have no array leaves
        self.seen.append((set(params), {k for k, v in updates.items() if jax.tree.leaves(v)}))
        return {k: (2.0 * v if str(k).startswith(QTHETA_PREFIX) else v)
                for k, v in updates.items()}


def test_natural_gradient_with_guide_passes_qtheta_sgd_steps_through_retract():
    g = _DoublingGuide()
    opt = natural_gradient(natgrad_lr=0.5, other=optax.sgd(0.1), guide=g)
    p = _params()
    upd, _ = opt.update(jax.tree.map(jnp.ones_like, p), opt.init(p), p)
    np.testing.assert_allclose(upd[f"{QTHETA_PREFIX}niw.m"], -1.0)  # 2 x (-0.5)
    np.testing.assert_allclose(upd["encoder$params"]["w"], -0.1)  # untouched
    # retract sees the parameters and only the q(theta) updates (the others are masked)
    assert g.seen == [({f"{QTHETA_PREFIX}niw.m", "encoder$params"},
                       {f"{QTHETA_PREFIX}niw.m"})]


def test_natural_gradient_with_guide_errors():
    class NotAGuide:
        pass

    with pytest.raises(TypeError, match="retract"):
        natural_gradient(natgrad_lr=1.0, guide=NotAGuide())
    g = _DoublingGuide()
    g.natural_gradients = False
    with pytest.raises(ValueError, match="natural_gradients=False"):
        natural_gradient(natgrad_lr=1.0, guide=g)
    g = _DoublingGuide()
    g.prefix = "other$"
    with pytest.raises(ValueError, match=r"prefix='qtheta\$'.*'other\$'"):
        natural_gradient(natgrad_lr=1.0, guide=g)
    opt = natural_gradient(natgrad_lr=1.0, guide=_DoublingGuide())
    p = _params()
    with pytest.raises(ValueError, match="params"):
        opt.update(jax.tree.map(jnp.ones_like, p), opt.init(p))


def test_natural_step_chooses_the_retraction():
    """``natural_step``: "linear" never calls the guide, "exact" calls ``retract(params,
    updates)``, "guarded" calls it with ``guarded=True``; the default follows `guide`."""

    class Recording(_DoublingGuide):
        def retract(self, params, updates, **kw):
            self.kw = kw
            return super().retract(params, updates)

    p = _params()
    grads = jax.tree.map(jnp.ones_like, p)
    for step, want in (("exact", {}), ("guarded", {"guarded": True}), (None, {})):
        g = Recording()
        opt = natural_gradient(natgrad_lr=0.5, guide=g, natural_step=step)
        upd, _ = opt.update(grads, opt.init(p), p)
        assert g.kw == want, step
        np.testing.assert_allclose(upd[f"{QTHETA_PREFIX}niw.m"], -1.0)
    g = Recording()
    opt = natural_gradient(natgrad_lr=0.5, guide=g, natural_step="linear")
    upd, _ = opt.update(grads, opt.init(p), p)
    assert not g.seen and not hasattr(g, "kw")
    np.testing.assert_allclose(upd[f"{QTHETA_PREFIX}niw.m"], -0.5)  # plain SGD
    with pytest.raises(ValueError, match="natural_step='guarded' needs the guide"):
        natural_gradient(natgrad_lr=0.5, natural_step="guarded")
    with pytest.raises(ValueError, match="must be one of linear, exact, guarded; got 'cubic'"):
        natural_gradient(natgrad_lr=0.5, guide=Recording(), natural_step="cubic")
