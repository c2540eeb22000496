"""Datasets for switching-dynamics models: loaders, a synthetic SLDS generator and helpers.

Loaders return :class:`SequenceDataset` (float32 windows, int32 per-frame labels, the
training statistics used for standardisation). The split is always made on whole
sequences/clips before windowing and standardisation uses training frames only. No loader
downloads anything: BasicMotions is read from the files of the installed ``aeon`` package
(optional extra ``numpyro_svae[data]``), mocap6 from a folder the user gives. See
``docs/datasets.md``.
"""

from numpyro_svae.datasets._windows import (
    SequenceDataset,
    Windows,
    apply_standardizer,
    fit_standardizer,
    make_windows,
    pad_sequences,
)
from numpyro_svae.datasets.basic_motions import (
    BASIC_MOTIONS_CHANNELS,
    BASIC_MOTIONS_LABELS,
    SwitchingSequences,
    basic_motions_clips,
    build_switching_sequences,
    load_basic_motions,
    read_ts_file,
)
from numpyro_svae.datasets.mocap6 import (
    CMU_SKELETON_DOFS,
    MOCAP6_SEQUENCES,
    AMCMotion,
    MotionSequence,
    downsample_motion,
    load_amc,
    load_mocap6,
    parse_amc,
)
from numpyro_svae.datasets.synthetic import (
    EmissionParams,
    SLDSTrueParams,
    SyntheticSLDS,
    emission_mean,
    synthetic_slds,
)

__all__ = [
    "AMCMotion",
    "BASIC_MOTIONS_CHANNELS",
    "BASIC_MOTIONS_LABELS",
    "CMU_SKELETON_DOFS",
    "EmissionParams",
    "MOCAP6_SEQUENCES",
    "MotionSequence",
    "SLDSTrueParams",
    "SequenceDataset",
    "SwitchingSequences",
    "SyntheticSLDS",
    "Windows",
    "apply_standardizer",
    "basic_motions_clips",
    "build_switching_sequences",
    "downsample_motion",
    "emission_mean",
    "fit_standardizer",
    "load_amc",
    "load_basic_motions",
    "load_mocap6",
    "make_windows",
    "pad_sequences",
    "parse_amc",
    "read_ts_file",
    "synthetic_slds",
]
