"""Defaults: each config file starts from ``base(model, task)``.

The run's shared keys (steps, batch, devices, data, optimizer, logging and checkpoints),
plus the section of its task alone: a tokenizer's losses, discriminator and codebook
start; the generators' (prior, maskgit) keys are set by their own config files. Every
default is written once, here.
"""

import ml_collections

from vqvae.distributed import STEP_TIMEOUT_S
from vqvae.model import VQVAEConfig
from vqvae.quantizers import every_setting


def base(model: VQVAEConfig | dict, task: str = "tokenizer") -> ml_collections.ConfigDict:
    """Shared defaults around a model config (a VQVAEConfig, or a generator's settings)
    and the ``task``'s own section."""
    c = ml_collections.ConfigDict()
    c.task = task  # what is trained: tokenizer, prior or maskgit (vqvae.tasks)
    c.seed = 0
    c.steps = 1000
    c.batch_size = 32
    c.num_devices = 0  # 0: every device
    c.fsdp = False  # shard parameters and optimizer state over the data axis too
    c.distributed = False  # start jax.distributed (also automatic under Slurm / Open MPI)
    c.step_timeout_s = STEP_TIMEOUT_S  # several processes: stop when no step ends this long
    c.model = model if isinstance(model, dict) else model.to_dict()
    if not isinstance(model, dict):  # every kind's settings: any kind on the command line
        c.model.quantizer = every_setting(model.quantizer)

    c.data = ml_collections.ConfigDict()
    c.data.source = "sample_photos"
    c.data.val_fraction = 0.02  # folder sources: share of files held out (stable hash)
    c.data.val_source = ""  # a separate held-out set, used in full (e.g. tfds:NAME:validation)
    c.data.data_dir = ""  # tfds data_dir ("" = tfds default)
    c.data.download = False  # tfds: download and prepare when missing
    c.data.workers = -1  # decoding processes per host; -1: every core for folders, 0: inline

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adam"
    c.optim.lr = 3e-4
    c.optim.b1, c.optim.b2 = 0.9, 0.999
    c.optim.weight_decay = 0.0
    c.optim.warmup_steps = 0
    c.optim.final_lr_fraction = 1.0  # 1.0: constant after warm-up
    c.optim.grad_clip = 0.0  # 0: no clipping

    c.log_every = 50
    c.eval_every = 500
    c.eval_batches = 8
    c.eval_batch_size = 64
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.tensorboard = True
    if task == "tokenizer":
        tokenizer_section(c)
    return c


def tokenizer_section(c: ml_collections.ConfigDict) -> None:
    """The keys only a tokenizer reads: its losses, the discriminator, k-means start."""
    c.kmeans_init = False  # start the codebook from k-means on the first batch's encodings
    # fine-tuning (vqvae/finetune.py, configs/finetune.py): start from a workdir, an
    # export folder or a released weight file (its model config replaces model)
    c.init_from = ""
    c.init_preset = ""  # a weight file's preset ("": the family's default)
    c.freeze = ""  # "encoder_codebook": decoder-only fine-tuning

    c.loss = ml_collections.ConfigDict()
    c.loss.pixel = "mse"  # "mse" (the VQ-VAE paper's) or "l1" (taming's)
    c.loss.normalize_by_variance = True  # MSE / data variance, as in the VQ-VAE paper
    c.loss.perceptual_weight = 0.0  # LPIPS; needs loss.lpips_weights (python -m vqvae.lpips)
    c.loss.lpips_weights = ""  # a .npz of VGG16 + LPIPS weights; "" leaves the term off

    # The VQGAN recipe's discriminator (vqvae/adversarial.py); weight 0: none
    c.gan = ml_collections.ConfigDict()
    c.gan.weight = 0.0  # the adversarial term's weight, on top of the adaptive weight
    c.gan.start_step = 0  # discriminator and adversarial term off before this step
    c.gan.loss = "hinge"  # or "non_saturating"
    c.gan.norm = "spectral"  # "group", "batch" or "none"
    c.gan.padding = "same"  # or "one": taming's (with norm "batch": its NLayerDiscriminator)
    c.gan.channels = 64  # PatchGAN width and depth
    c.gan.layers = 3
    c.gan.max_adaptive_weight = 1e4
    c.gan.lecam_weight = 0.0  # LeCam regularisation of the discriminator (0: off)
    c.gan.lecam_decay = 0.99
    c.gan.optim = ml_collections.ConfigDict()  # the discriminator's own optimizer
    c.gan.optim.name = "adam"
    c.gan.optim.lr = 1e-4
    c.gan.optim.b1, c.gan.optim.b2 = 0.5, 0.9
    c.gan.optim.weight_decay = 0.0
    c.gan.optim.warmup_steps = 0
    c.gan.optim.final_lr_fraction = 1.0
    c.gan.optim.grad_clip = 0.0
    c.dead_code_report_threshold = 1e-3
