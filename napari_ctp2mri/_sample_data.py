"""npe2 sample data: a digital stroke phantom case, generated offline in a few seconds."""

from __future__ import annotations

from napari_ctp2mri._layers import LayerData, case_to_layer_data

# Seed 5: a left-MCA stroke with a 68 ml core inside a larger penumbra (phantom 1.0),
# so the sample shows what the method is about; seed 0 has only a tiny lacune.
SAMPLE_SEED = 5


def stroke_phantom_case(seed: int = SAMPLE_SEED, profile: str = "demo") -> list[LayerData]:
    """The layers of one phantom case (CTP, DWI, ADC, brain mask, lesion).

    The same layers, names and display settings as opening a case folder, so the sample is
    exactly what a user's own data will look like.
    """
    from ctp2mri.phantom import generate_case

    return case_to_layer_data(generate_case(seed, profile=profile))
