"""numpyro_svae: structured variational autoencoders as a drop-in part of NumPyro's SVI.

Public API (see README.md and docs/):

- :func:`fit`: one call from a NumPyro model and data to a trained model (staged start,
  restarts, stopping rule, failure checks);
- :class:`SVAEGuide`, :class:`SVAE_ELBO`, :func:`natural_gradient`: guide, loss and optimizer
  for :class:`numpyro.infer.SVI` (the optimizer skips non-finite steps; :func:`skipped_steps`
  reads its counters);
- :func:`discover_structure` / :class:`ConjugateStructure`: what the guide finds in a model;
- :mod:`numpyro_svae.nn`: default encoder and decoder networks;
- :mod:`numpyro_svae.models`: ready-made SLDS / LDS / HMM models;
- :func:`impute`, :func:`forecast`, :func:`importance_weighted_bound`: prediction;
- :func:`to_inference_data`: ArviZ export;
- :mod:`numpyro_svae.initialize`: switching initialisation of an SLDS-SVAE from an AR-HMM
  fitted to latents (:func:`~numpyro_svae.initialize.arhmm_init`);
- the pure-JAX layers :mod:`~numpyro_svae.messages`, :mod:`~numpyro_svae.expfam`,
  :mod:`~numpyro_svae.meanfield`.
"""

from numpyro_svae import datasets, expfam, initialize, meanfield, messages, metrics, models, nn
from numpyro_svae.diagnostics import to_inference_data
from numpyro_svae.elbo import SVAE_ELBO
from numpyro_svae.fitting import FitResult, FitSummary, FitWarning, Stage, SwitchStart, fit
from numpyro_svae.guide import SVAEGuide, SVAEPosterior
from numpyro_svae.optim import SkippedSteps, natural_gradient, skipped_steps
from numpyro_svae.predict import forecast, importance_weighted_bound, impute
from numpyro_svae.structure import ConjugateStructure, discover_structure

__version__ = "0.1.0"

__all__ = [
    "ConjugateStructure",
    "FitResult",
    "FitSummary",
    "FitWarning",
    "SVAEGuide",
    "SVAEPosterior",
    "SVAE_ELBO",
    "SkippedSteps",
    "Stage",
    "SwitchStart",
    "datasets",
    "discover_structure",
    "expfam",
    "fit",
    "forecast",
    "importance_weighted_bound",
    "impute",
    "initialize",
    "meanfield",
    "messages",
    "metrics",
    "models",
    "natural_gradient",
    "nn",
    "skipped_steps",
    "to_inference_data",
]
