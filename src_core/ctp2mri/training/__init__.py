"""Training loops: VQGAN autoencoder, conditional LDM and its lesion-aware post-training; the
baselines' latent Brownian bridge (`train_bbdm`, post-trained by `post_train` too) and Pix2Pix.

`train_autoencoder`, `train_ldm`, `train_bbdm`, `train_pix2pix` and `post_train` each drive a
whole run (data, model, optimiser, EMA, precision, checkpoints into the run folder, log.csv,
progress/cancel, exact resume) and run unchanged under ``torchrun --nproc_per_node N``;
`TrainSettings` and `PostTrainSettings` say what the latent models' runs are asked to do.
"""

from ctp2mri.training.autoencoder import train_autoencoder
from ctp2mri.training.bbdm import train_bbdm
from ctp2mri.training.ema import EMA
from ctp2mri.training.ldm import train_ldm
from ctp2mri.training.loop import LOG_FILE, effective_lr
from ctp2mri.training.pix2pix import train_pix2pix
from ctp2mri.training.post_train import PostTrainSettings, post_train, post_training_loss
from ctp2mri.training.run_settings import TrainSettings

__all__ = ["EMA", "LOG_FILE", "PostTrainSettings", "TrainSettings", "effective_lr", "post_train",
           "post_training_loss", "train_autoencoder", "train_bbdm", "train_ldm", "train_pix2pix"]
