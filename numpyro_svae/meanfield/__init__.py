"""Structured mean-field inference for the SLDS (and its LDS / HMM / GMM special cases).

Pure JAX, unbatched (``vmap`` over sequences); gradients through the fixed point by one
custom VJP (implicit function theorem, capped Richardson by default) or by unrolling.
"""

from numpyro_svae.meanfield.fixed_point import (
    DEFAULT_OPTIONS,
    FixedPointInfo,
    FixedPointOptions,
    fixed_point,
)
from numpyro_svae.meanfield.iid import IIDResult, mf_fixed_point_iid, mf_sample_iid
from numpyro_svae.meanfield.kl import (
    encoder_expected_log_potential,
    iid_local_kl,
    mf_sample,
    slds_local_kl,
)
from numpyro_svae.meanfield.potentials import (
    IIDGlobalPotentials,
    SLDSGlobalPotentials,
    hmm_to_lds_potentials,
    iid_expected_potentials,
    lds_expected_potentials,
    lds_to_hmm_log_potentials,
    slds_expected_potentials,
)
from numpyro_svae.meanfield.slds import (
    MFInfo,
    MFResult,
    MFState,
    mf_block_update,
    mf_fixed_point,
    mf_local_kl,
)

__all__ = [
    "DEFAULT_OPTIONS",
    "FixedPointInfo",
    "FixedPointOptions",
    "IIDGlobalPotentials",
    "IIDResult",
    "MFInfo",
    "MFResult",
    "MFState",
    "SLDSGlobalPotentials",
    "encoder_expected_log_potential",
    "fixed_point",
    "hmm_to_lds_potentials",
    "iid_expected_potentials",
    "iid_local_kl",
    "lds_expected_potentials",
    "lds_to_hmm_log_potentials",
    "mf_block_update",
    "mf_fixed_point",
    "mf_fixed_point_iid",
    "mf_local_kl",
    "mf_sample",
    "mf_sample_iid",
    "slds_expected_potentials",
    "slds_local_kl",
]
