"""Exact message passing in chains: information-form Kalman smoothing and forward-backward."""

from numpyro_svae.messages.hmm import (
    HMMPosterior,
    HMMPotentials,
    hmm_expected_stats_by_grad,
    hmm_filter,
    hmm_log_normalizer,
    hmm_sample,
    hmm_smoother,
    hmm_smoother_parallel,
    hmm_smoother_sequential,
)
from numpyro_svae.messages.lds import (
    LDSPosterior,
    LDSPotentials,
    LDSSampler,
    lds_expected_stats_by_grad,
    lds_filter,
    lds_log_normalizer,
    lds_sample,
    lds_sample_from,
    lds_smoother,
    lds_smoother_parallel,
    lds_smoother_sequential,
    lds_smoother_with_sampler,
)
from numpyro_svae.messages.lds_stats import LDSStats, lds_expected_stats

__all__ = [
    "HMMPosterior",
    "HMMPotentials",
    "LDSPosterior",
    "LDSPotentials",
    "LDSSampler",
    "LDSStats",
    "hmm_expected_stats_by_grad",
    "hmm_filter",
    "hmm_log_normalizer",
    "hmm_sample",
    "hmm_smoother",
    "hmm_smoother_parallel",
    "hmm_smoother_sequential",
    "lds_expected_stats",
    "lds_expected_stats_by_grad",
    "lds_filter",
    "lds_log_normalizer",
    "lds_sample",
    "lds_sample_from",
    "lds_smoother_with_sampler",
    "lds_smoother",
    "lds_smoother_parallel",
    "lds_smoother_sequential",
]
