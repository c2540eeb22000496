"""Invalid hyper-parameters raise ValueError naming the argument (on concrete arrays only)."""

import jax
import jax.numpy as jnp
import pytest

from numpyro_svae import expfam as E

I2 = jnp.eye(2)
NOT_PD = jnp.asarray([[1.0, 2.0], [2.0, 1.0]])


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: E.niw_to_natural(E.NIWStandard(NOT_PD, jnp.zeros(2), 1.0, 4.0)), "S"),
        (lambda: E.niw_to_natural(E.NIWStandard(jnp.ones((2, 3)), jnp.zeros(2), 1.0, 4.0)),
         "S"),
        (lambda: E.niw_to_natural(E.NIWStandard(I2, jnp.zeros(3), 1.0, 4.0)), "m"),
        (lambda: E.niw_to_natural(E.NIWStandard(I2, jnp.zeros(2), 0.0, 4.0)), "lam"),
        (lambda: E.niw_to_natural(E.NIWStandard(I2, jnp.zeros(2), 1.0, 1.0)), "nu"),
        (lambda: E.mniw_to_natural(E.MNIWStandard(I2, jnp.zeros((2, 3)), NOT_PD, 4.0)), "V"),
        (lambda: E.mniw_to_natural(E.MNIWStandard(I2, jnp.zeros((2, 3)), I2, 4.0)), "V"),
        (lambda: E.mniw_to_natural(E.MNIWStandard(I2, jnp.zeros((3, 3)), jnp.eye(3), 4.0)),
         "M"),
        (lambda: E.mniw_to_natural(E.MNIWStandard(NOT_PD, jnp.zeros((2, 2)), I2, 4.0)), "S"),
        (lambda: E.mniw_to_natural(E.MNIWStandard(I2, jnp.zeros((2, 2)), I2, 0.5)), "nu"),
        (lambda: E.dirichlet_to_natural(E.DirichletStandard(jnp.asarray([1.0, 0.0]))),
         "alpha"),
        (lambda: E.dirichlet_to_natural(E.DirichletStandard(jnp.asarray(1.0))), "alpha"),
        (lambda: E.gaussian_to_natural(E.GaussianStandard(jnp.zeros(2), NOT_PD)), "cov"),
        (lambda: E.gaussian_to_natural(E.GaussianStandard(jnp.zeros(3), I2)), "mean"),
        (lambda: E.dirichlet_from_numpyro(jnp.asarray([[1.0, -1.0]])), "concentration"),
        (lambda: E.niw_from_numpyro(1.0, jnp.zeros(2), 1.0, scale_matrix=I2), "df"),
        (lambda: E.niw_from_numpyro(4.0, jnp.zeros(2), 1.0, scale_matrix=NOT_PD),
         "scale_matrix"),
        (lambda: E.niw_from_numpyro(4.0, jnp.zeros(2), -1.0, scale_matrix=I2), "lam"),
        (lambda: E.niw_from_numpyro(4.0, jnp.zeros(3), 1.0, scale_matrix=I2), "loc"),
        (lambda: E.niw_from_numpyro(4.0, jnp.zeros(2), 1.0, scale_matrix=I2, scale_tril=I2),
         "scale_tril"),
        (lambda: E.mniw_from_numpyro(4.0, jnp.zeros((2, 3)), I2, scale_matrix=I2),
         "scale_tril_column"),
        (lambda: E.mniw_from_numpyro(4.0, jnp.zeros((3, 3)), jnp.eye(3), scale_matrix=I2),
         "loc"),
        (lambda: E.mniw_from_numpyro(1.0, jnp.zeros((2, 3)), jnp.eye(3), scale_matrix=I2),
         "df"),
    ],
)
def test_invalid_hyperparameters_raise_value_error_naming_argument(make, name):
    with pytest.raises(ValueError, match=f"`{name}"):
        make()


def test_value_checks_are_skipped_under_jit():
    # a traced S cannot be checked; the caller (the front) validates concrete values first
    f = jax.jit(lambda S: E.niw_to_natural(E.NIWStandard(S, jnp.zeros(2), 1.0, 4.0)).eta1)
    assert f(NOT_PD).shape == (2, 2)
