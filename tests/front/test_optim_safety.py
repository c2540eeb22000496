"""`natural_gradient` skips non-finite steps (gradients, natural-step output, new parameters)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numpyro.optim import optax_to_numpyro

from numpyro_svae.optim import QTHETA_PREFIX, SkippedSteps, natural_gradient, skipped_steps

Q, NET = f"{QTHETA_PREFIX}niw.m", "encoder$params"


def _params():
    return {Q: jnp.array([1.0, -2.0]), NET: {"w": jnp.array([0.5, 1.5, -1.0])}}


def _grads(q=(0.5, -1.0), w=(1.0, 2.0, -3.0)):
    return {Q: jnp.array(q, jnp.float32), NET: {"w": jnp.array(w, jnp.float32)}}


def _assert_trees_equal(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(x, y)


def _counts(state):
    c = skipped_steps(state)
    return int(c.total), int(c.consecutive), bool(c.last_finite)


def _optimizer(**kw):
    # a schedule (step count), momentum and Adam: every part has state a bad step could touch
    return natural_gradient(schedule=optax.linear_schedule(0.5, 0.1, 10), momentum=0.9,
                            other=optax.adam(1e-2), **kw)


@pytest.mark.parametrize("jit", [False, True])
def test_nan_gradient_in_either_rule_is_skipped_then_a_finite_step_resets_the_run(jit):
    """Through numpyro's optax wrapper (what SVI.update calls): a NaN in a q(theta) leaf, then
    one in a network leaf, leave parameters and inner state bit for bit; counters go 1, 2;
    the next finite step moves both and resets the run of consecutive skips."""
    opt = optax_to_numpyro(_optimizer())
    update = jax.jit(opt.update) if jit else opt.update
    state = opt.init(_params())
    state = update(_grads(), state, value=jnp.float32(1.0))  # one real step first
    assert _counts(state) == (0, 0, True)
    before = state
    state = update(_grads(q=(np.nan, 1.0)), state, value=jnp.float32(1.0))
    assert _counts(state) == (1, 1, False)
    state = update(_grads(w=(1.0, np.inf, 0.0)), state, value=jnp.float32(1.0))
    assert _counts(state) == (2, 2, False)
    _assert_trees_equal(opt.get_params(state), opt.get_params(before))
    _assert_trees_equal(state[1][1].inner_state, before[1][1].inner_state)
    state = update(_grads(), state, value=jnp.float32(1.0))
    assert _counts(state) == (2, 0, True)
    after, prev = opt.get_params(state), opt.get_params(before)
    assert not np.any(np.asarray(after[Q]) == np.asarray(prev[Q]))
    assert not np.any(np.asarray(after[NET]["w"]) == np.asarray(prev[NET]["w"]))
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(after))


def test_skip_matches_a_run_without_the_bad_step():
    """A skipped step is invisible: the finite steps around it give exactly what they give
    without it (schedule count, momentum and Adam moments untouched)."""
    opt = _optimizer()
    p = _params()
    g1, g2 = _grads(), _grads(q=(-0.3, 0.2), w=(0.1, -0.4, 2.0))
    s = opt.init(p)
    u1, s = opt.update(g1, s, p)
    p1 = optax.apply_updates(p, u1)
    u_bad, s_bad = opt.update(_grads(q=(np.nan, np.nan)), s, p1)
    _assert_trees_equal(u_bad, jax.tree.map(jnp.zeros_like, u_bad))
    u2, _ = opt.update(g2, s_bad, p1)
    u2_clean, _ = opt.update(g2, s, p1)
    _assert_trees_equal(u2, u2_clean)


class _BadRetract:
    """Stands in for SVAEGuide: `retract` turns finite q(theta) updates into `fill`."""

    natural_gradients = True

    def __init__(self, fill):
        self.fill = fill

    def retract(self, params, updates, **kw):
        del params, kw
        return {k: (jnp.full_like(v, self.fill) if str(k).startswith(QTHETA_PREFIX) else v)
                for k, v in updates.items()}


@pytest.mark.parametrize("natural_step", ["exact", "guarded"])
@pytest.mark.parametrize("fill", [np.nan, np.inf, 3e38])
def test_non_finite_natural_step_from_finite_gradients_is_skipped(natural_step, fill):
    """Finite gradients, but the natural step (``guide.retract``) returns NaN / inf, or a
    finite update that overflows the parameters (3e38 + 1 in float32 stays finite, 3e38 +
    3e38 does not): the step is skipped all the same, jitted or not."""
    opt = _optimizer(guide=_BadRetract(fill), natural_step=natural_step)
    p = {Q: jnp.array([3e38, 1.0]), NET: {"w": jnp.ones(3)}}
    s0 = opt.init(p)
    for update in (opt.update, jax.jit(opt.update)):
        u, s = update(_grads(), s0, p)
        assert _counts(s) == (1, 1, False)
        _assert_trees_equal(optax.apply_updates(p, u), p)
        _assert_trees_equal(s.inner_state, s0.inner_state)
    # the same optimizer with a usable natural step takes it
    opt = _optimizer(guide=_BadRetract(-0.25), natural_step=natural_step)
    u, s = opt.update(_grads(), opt.init(p), p)
    assert _counts(s) == (0, 0, True)
    np.testing.assert_array_equal(u[Q], -0.25)


def test_skipped_steps_reads_svi_numpyro_and_chained_states():
    opt = _optimizer()
    p = _params()
    s = opt.init(p)
    _, s = opt.update(_grads(q=(np.nan, 0.0)), s, p)
    want = (1, 1, False)
    assert _counts(s) == want
    assert _counts((jnp.array(3), (p, s))) == want  # numpyro's optimizer state
    chained = optax.chain(optax.clip_by_global_norm(1.0), opt)
    cs = chained.init(p)
    _, cs = chained.update(_grads(w=(np.nan, 0.0, 0.0)), cs, p)
    assert _counts(cs) == want
    assert isinstance(skipped_steps(s), SkippedSteps)
    with pytest.raises(ValueError, match="natural_gradient"):
        skipped_steps(optax.adam(1e-3).init(p))


@pytest.mark.slow
def test_svi_step_on_poisoned_data_keeps_parameters(key):
    """A real SVAE: data so large that the loss and its gradient are NaN. ``SVI.update``
    (under ``jax.jit``) keeps every parameter finite and equal to before and counts
    the skip; the next step on clean data is taken and ends the run of skips.  (The eager
    ``SVI.update`` runs the same optimizer code; it is left out here because tracing the whole
    step op by op costs about a minute.)"""
    from numpyro.infer import SVI

    from numpyro_svae.elbo import SVAE_ELBO
    from numpyro_svae.guide import SVAEGuide
    from numpyro_svae.models import slds_model
    from numpyro_svae.nn import GaussianPotentialEncoder

    N, T, K, D, DX = 2, 6, 2, 2, 3
    kw = dict(N=N, T=T, K=K, D=D, Dx=DX, hidden=(4,))
    x = np.random.default_rng(0).normal(size=(N, T, DX)).astype(np.float32)
    bad = np.full_like(x, 1e30)  # finite (passes the data checks), overflows the loss
    enc = GaussianPotentialEncoder(obs_dim=DX, latent_dim=D, hidden=(4,),
                                   key=jax.random.key(1))
    guide = SVAEGuide(slds_model, encoder=enc, max_iters=5)
    svi = SVI(slds_model, guide,
              natural_gradient(natgrad_lr=0.1, guide=guide, other=optax.adam(1e-2)),
              loss=SVAE_ELBO())
    state = svi.init(key, x, **kw)
    p0 = svi.get_params(state)
    assert any(k.startswith(QTHETA_PREFIX) for k in p0) and "encoder$params" in p0
    step = jax.jit(lambda s, data: svi.update(s, data, **kw))
    s1, loss = step(state, bad)
    assert not np.isfinite(loss)
    assert _counts(s1) == (1, 1, False)
    p1 = svi.get_params(s1)
    assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(p1))
    _assert_trees_equal(p1, p0)
    _assert_trees_equal(s1.optim_state[1][1].inner_state,
                        state.optim_state[1][1].inner_state)
    s2, loss = step(s1, x)
    assert np.isfinite(loss)
    assert _counts(s2) == (1, 0, True)
    p2 = svi.get_params(s2)
    assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(p2))

    def moved(prefix):
        return any(not np.array_equal(a, b)
                   for k in p0 if k.startswith(prefix)
                   for a, b in zip(jax.tree.leaves(p2[k]), jax.tree.leaves(p0[k]), strict=True))

    assert moved(QTHETA_PREFIX) and moved("encoder$")
