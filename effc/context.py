"""PassContext: what every pass may read besides the model."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np


@dataclass
class PassContext:
    """Calibration inputs, seed, threads and the shapes for symbolic dims.

    ``calibration`` is a list of input dicts (name -> array) in the model's input names;
    ``calibration_info`` says where they came from (it goes into the report).
    """

    calibration: list[dict[str, np.ndarray]] = field(default_factory=list)
    calibration_info: dict = field(default_factory=dict)
    seed: int = 0
    threads: int = 2
    shapes: dict[str, list[int]] = field(default_factory=dict)
    eval_seeds: int = 2
    error_samples: int = 4  # calibration inputs a lossy pass's output error is measured on
    # set by the pipeline when a later pass distills from the model as it was before the
    # structural passes (cure): those passes keep a frozen copy first
    keep_teacher: bool = False
    # set by the streaming engine (effc.stream): the model is this one stage of a larger model, a
    # block ("model.layers.3", which block-wise passes such as gqsa-train's bqpo take as their
    # only block) or "head"; "" everywhere else
    stage_block: str = ""

    def __post_init__(self) -> None:
        os.environ.setdefault("EFFC_THREADS", str(self.threads))
        os.environ.setdefault("OMP_NUM_THREADS", str(self.threads))
