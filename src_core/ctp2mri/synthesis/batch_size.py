"""How many slice-samples go into one network call: `auto_batch_size`, from free memory.

The batch size never changes a synthesis result (`ctp2mri.synthesis.seeding`), only its speed
and memory; an out-of-memory error on the GPU halves it (`ctp2mri.synthesis.inference`).
"""

from __future__ import annotations

import torch

from ctp2mri.synthesis.loading import LoadedModel

__all__ = ["auto_batch_size"]


def _row_bytes(model: LoadedModel, height: int, width: int) -> int:
    """Rough peak memory of one slice-sample in a batch (inference mode, float32).

    The UNet keeps its skip connections (~2 per resolution level and block) at the latent
    size; the decoder's widest level runs at full resolution. The factors are generous so the
    guess errs towards smaller batches; an out-of-memory error on the GPU halves the batch.
    """
    h, w = model.autoencoder.latent_shape(height, width)[-2:]
    unet = model.cldm.config.get("channels", [64])
    blocks = 2 * int(model.cldm.config.get("num_res_blocks", 2)) + 2
    unet_floats = sum(c * (h >> lvl) * (w >> lvl) * blocks for lvl, c in enumerate(unet)) * 4
    decoder_floats = max(model.autoencoder.config.get("channels", [64])) * height * width * 8
    return 4 * (unet_floats + decoder_floats)


def auto_batch_size(model: LoadedModel, height: int, width: int, rows: int) -> int:
    """Rows per network call from free memory: half of it over `_row_bytes`, capped.

    Free memory is ``torch.cuda.mem_get_info`` on CUDA, the system's available memory
    (psutil) elsewhere. CPU batches are capped at 32: larger ones no longer speed up
    convolutions and only delay the first progress report.
    """
    dev = model.device
    if dev.type == "cuda":
        free = torch.cuda.mem_get_info(dev)[0]
        cap = 512
    else:
        import psutil

        free = psutil.virtual_memory().available
        cap = 32
    fit = int(0.5 * free // max(_row_bytes(model, height, width), 1))
    return max(1, min(fit, cap, max(int(rows), 1)))
