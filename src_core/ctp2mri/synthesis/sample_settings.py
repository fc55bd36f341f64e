"""What a synthesis run is asked to do: `SampleSettings`, checked when made.

`ctp2mri.synthesis.synthesize.synthesize` and `run_synthesize`, and
`ctp2mri.synthesis.cohort.synthesize_cohort` take one, and/or its fields as keywords
(`ctp2mri.checks.settings_with`); the CLI builds one from its options and the synthesis widget from its
controls. A bad value is therefore refused in the same words wherever it comes from, before a
model is loaded or a CTP read. The module imports neither torch nor a model, so a GUI can
check its fields cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ctp2mri.checks import number, whole
from ctp2mri.errors import InputError
from ctp2mri.settings import CORE_ADC_THRESHOLD, DEFAULT_SAMPLER, PRECISIONS, SAMPLER_STEPS, sampler_steps

__all__ = ["SampleSettings"]

#: Seeds are mixed by numpy's SeedSequence and recorded in report.json: keep them 63-bit.
MAX_SEED = 2**63 - 1
#: An ADC threshold above this (10⁻⁶ mm²/s) would call all tissue core, CSF included.
MAX_CORE_THRESHOLD = 10000.0


@dataclass(frozen=True)
class SampleSettings:
    """The settings of a synthesis run that change its result (except ``batch_size``, which
    changes only its speed). Checked when made: a bad value raises `InputError` naming it.

    Attributes
    ----------
    sampler
        ``"dpm++2m"`` (DPM-Solver++(2M), the default) or ``"ddim"`` (the paper's).
    steps
        Denoising steps; None: the sampler's default (`ctp2mri.settings.SAMPLER_STEPS`), so a
        changed ``sampler`` brings its own. `n_steps` is the number used.
    eta
        DDIM's stochasticity η in [0, 1] (0: deterministic). DPM-Solver++(2M) is
        deterministic: η must be 0.
    samples
        K samples per slice; K > 1 gives the uncertainty maps.
    seed
        Run seed; each slice's noise depends on (seed, z index on the model grid, sample).
    batch_size
        Slice-samples per network call; None picks it from free memory. It never changes the
        result.
    precision
        ``fp32``, ``bf16`` or ``fp16``: autocast of the denoiser on CUDA; float32 elsewhere.
    use_ema
        Sample with the EMA weights (as the paper and CompVis do); False: the raw training
        weights. It applies when the model is loaded from a folder; a `LoadedModel` keeps the
        weights it was loaded with (recorded in the report).
    core_threshold
        ADC threshold of the core estimate, 10⁻⁶ mm²/s.
    """

    sampler: str = DEFAULT_SAMPLER
    steps: int | None = None
    eta: float = 0.0
    samples: int = 1
    seed: int = 0
    batch_size: int | None = None
    precision: str = PRECISIONS[0]
    use_ema: bool = True
    core_threshold: float = CORE_ADC_THRESHOLD

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLER_STEPS:
            raise InputError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLER_STEPS)}")
        if self.precision not in PRECISIONS:
            raise InputError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if not isinstance(self.use_ema, bool):
            raise InputError(f"use_ema must be True or False, got {self.use_ema!r}")
        checked = {
            "steps": None if self.steps is None else whole(self.steps, "steps", minimum=1),
            "eta": number(self.eta, "eta", minimum=0.0, maximum=1.0),
            "samples": whole(self.samples, "samples", minimum=1),
            "seed": whole(self.seed, "seed", minimum=0, maximum=MAX_SEED),
            "batch_size": None if self.batch_size is None else whole(self.batch_size, "batch size", minimum=1),
            "core_threshold": number(self.core_threshold, "core threshold (ADC, 10⁻⁶ mm²/s)", above=0.0,
                                     maximum=MAX_CORE_THRESHOLD),
        }
        if self.sampler != "ddim" and checked["eta"] != 0:
            raise InputError(f"eta = {checked['eta']:g} applies to DDIM only; {self.sampler} is deterministic "
                             "(use eta 0, or sampler ddim)")
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @property
    def n_steps(self) -> int:
        """The denoising steps the run takes: ``steps``, or the sampler's default."""
        return sampler_steps(self.sampler, self.steps)

    def recorded(self) -> dict[str, Any]:
        """The settings that change the result, as a cohort records them (``cohort.json``): all
        but ``batch_size`` and ``use_ema`` (the cohort records the weights actually loaded)."""
        return {"sampler": self.sampler, "steps": self.n_steps, "eta": self.eta, "samples": self.samples,
                "seed": self.seed, "precision": self.precision, "core_threshold": self.core_threshold}

