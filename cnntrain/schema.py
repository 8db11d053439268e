"""Every config key, declared once: its type and default (structured configs in Hydra's
ConfigStore, so composition itself refuses a value of the wrong type or a key that does not
exist) and its allowed range or choices (field metadata, checked by `check` right after
composition, before anything is built or written). The YAML files under configs/ keep the
values and extend these declarations through their defaults lists.

OmegaConf checks types but not ranges, hence the small checker here; it also turns each
failure into one line that names the key, the value, what is allowed and the default."""

import difflib
import math
import re
from dataclasses import MISSING as NO_DEFAULT
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Dict, List, Optional, cast

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from cnntrain.errors import UserError
from cnntrain.options import config_options

# What a resumed run may do with a training key (`resume=` of its declaration; resume.py compares
# a checkpoint's config with the new one by these):
FREE = "free"  # says where or how fast to compute, not what: may differ (another device, workers)
FIXED = "fixed"  # defines the network or what it learns from: a change is always refused
ALLOW = "allow"  # changes only on purpose, listed in resume_allow_changes
REPLAN = "replan"  # as ALLOW, and the learning-rate schedule is re-planned for the new value
EPOCH = "epoch"  # as REPLAN, and only between epochs: it sets the batches of an epoch
RESUME_CLASSES = (FREE, FIXED, ALLOW, REPLAN, EPOCH)


def key(default=None, help: str = "", *, factory=None, **rules):
    """A config key: `default` (or `factory` for lists), a one-line `help`, and its rules:
    ge/gt/le/lt (numbers, also each item of a list), choices, pattern (a regex for strings),
    length (of a list), finite (numbers; on by default), kinds (the types an Any key takes:
    None, str, bool, int, float (any number), list), what (what is allowed, in words, where
    the rules' own wording would not say it well); a training key also says what a resume may
    do with it (`resume=`, one of RESUME_CLASSES; tests/test_config.py requires it of every one)."""
    if rules.get("resume", FREE) not in RESUME_CLASSES:
        raise ValueError(f"resume={rules['resume']!r}: one of {RESUME_CLASSES}")
    meta = {"help": help, **rules}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def flag(default, help: str, **rules):
    """A true/false key. Declared as Any with strict choices rather than bool, because OmegaConf
    turns any integer into a bool (amp=2 would silently mean true)."""
    choices = (True, False) if default is not None else (None, True, False)
    return key(default, help, choices=choices, **rules)


# --------------------------------------------------------------------------- train groups
# What a dataset's images are: each kind has its own aug.<kind> geometry (clothing wants flips
# and no rotation, digits the opposite), chosen by data.kind rather than by channel count.
KINDS = ("digits", "clothing", "natural")


@dataclass
class ModelConfig:
    """The arguments of models.create_model (in_channels, num_classes and image_size come from
    the data), which builds the model by name: no `_target_`, so that a config read back from a
    checkpoint names no code to run (stored.py)."""

    name: str = key(
        MISSING,
        "the architecture (model=<option>, or any torchvision/timm name with model=tv|timm)",
        resume=FIXED,
    )
    stem: str = key(
        "auto",
        "first layers: auto (small up to 64 px), small or imagenet",
        choices=("auto", "small", "imagenet"),
        resume=FIXED,
    )
    source: str = key(
        "cnntrain",
        "where the architecture comes from",
        choices=("cnntrain", "torchvision", "timm"),
        resume=FIXED,
    )
    pretrained: Any = key(
        None,
        "torchvision weights name (e.g. IMAGENET1K_V1; timm: true) or a "
        "state_dict / checkpoint file",
        kinds=(None, str, bool),
        resume=FIXED,
    )
    freeze: Any = key(
        "none",
        "none | backbone | all_but_head | [parameter-name prefixes]",
        kinds=(str, list),
        resume=FIXED,
    )
    dropout: Optional[float] = key(
        None,
        "dropout probability of models that have one (null: the model's default)",
        ge=0,
        lt=1,
        resume=FIXED,
    )
    stochastic_depth_prob: Optional[float] = key(
        None, "EfficientNet's stochastic depth (null: its default)", ge=0, lt=1, resume=FIXED
    )
    args: Dict[str, Any] = key(
        factory=dict,
        help="other keyword arguments of the model's "
        "constructor (torchvision/timm), e.g. +model.args.drop_rate=0.1",
        resume=FIXED,
    )


@dataclass
class DataConfig:
    # no choices here: the datasets are those of cnntrain/data (build_data names them)
    name: str = key(MISSING, "the dataset (data=<option>)", resume=FIXED)
    kind: str = key(
        "natural",
        "which aug.<kind> section aug=basic/strong apply to these images",
        choices=KINDS,
        resume=ALLOW,
    )
    root: Optional[str] = key(
        "data",
        "folder handed to torchvision as root (image folders: the folder with train/, val/, test/)",
        resume=FREE,
    )
    download: Any = flag(True, "fetch the files with torchvision if they are missing", resume=FREE)
    batch_size: int = key(64, "images per batch (per process under torchrun)", ge=1, resume=EPOCH)
    num_workers: Optional[int] = key(
        None,
        "image folders: processes decoding the images into the cache (null: one per CPU core)",
        ge=0,
        le=256,
        resume=FREE,
    )
    val_split: float = key(
        0.1, "fraction of train held out for validation", ge=0, lt=1, resume=FIXED
    )
    image_size: Any = key(
        None,
        "model input size in px; null or auto: the native size (image "
        "folders: the images' common size, else their median short side, "
        "at most 224)",
        kinds=(None, int, str),
        pattern="auto",
        ge=1,
        le=2048,
        resume=FIXED,
    )
    channels: Any = key(
        "auto",
        "image folders: 1 (gray) or 3 (RGB); auto: 1 when every image is "
        "gray and data.mean has no 3 values",
        choices=("auto", 1, 3),
        resume=FIXED,
    )
    cache_dir: Optional[str] = key(
        None,
        "where image folders are decoded to (null: $CNNTRAIN_CACHE, "
        "else $XDG_CACHE_HOME/cnntrain, else ~/.cache/cnntrain)",
        resume=FREE,
    )
    memory_budget_gb: Optional[float] = key(
        None,
        "images kept on the training device up to this "
        "size, the rest streamed from host memory (null: "
        "half the device's free memory)",
        ge=0,
        resume=FREE,
    )
    mean: Optional[List[float]] = key(
        None,
        "per-channel mean of the pixels in 0..1 (1 value for gray, 3 for RGB; null: measured)",
        length=(1, 3),
        resume=FIXED,
    )
    std: Optional[List[float]] = key(
        None, "per-channel std of the pixels in 0..1", gt=0, length=(1, 3), resume=FIXED
    )
    skip_bad_images: Any = flag(
        False, "image folders: leave unreadable images out instead of stopping", resume=FREE
    )
    sampler: str = key(
        "random",
        "training batches: random (each image once per epoch) or balanced (classes drawn "
        "equally often, images with replacement; the epoch keeps its length)",
        choices=("random", "balanced"),
        resume=EPOCH,
    )


@dataclass
class GeometryConfig:
    shift: int = key(0, "random shift of up to this many px (zero fill)", ge=0, le=64, resume=ALLOW)
    degrees: float = key(0.0, "random rotation of up to +-degrees", ge=0, le=180, resume=ALLOW)
    hflip: Any = flag(False, "random horizontal flip", resume=ALLOW)
    crop_scale: Optional[List[float]] = key(
        None,
        "random-resized-crop area range [min, max] (e.g. "
        "[0.08, 1]; null: no such crop; image folders are "
        "then stored at 1.14 x image_size)",
        gt=0,
        le=1,
        length=(2,),
        resume=ALLOW,
    )
    scale: Optional[List[float]] = key(
        None,
        "random zoom factor range [min, max] per image (e.g. [0.9, 1.1]; null: none)",
        gt=0,
        length=(2,),
        resume=ALLOW,
    )


@dataclass
class AugConfig:
    name: str = key("none", "the augmentation preset (aug=<option>)", resume=ALLOW)
    digits: GeometryConfig = field(default_factory=GeometryConfig)
    clothing: GeometryConfig = field(default_factory=GeometryConfig)
    natural: GeometryConfig = field(default_factory=GeometryConfig)
    policy: Optional[str] = key(
        None, "per-image policy", choices=(None, "randaugment", "autoaugment"), resume=ALLOW
    )
    color_jitter: float = key(
        0.0,
        "brightness, contrast and saturation factors drawn from [1 - x, 1 + x] per image",
        ge=0,
        le=1,
        resume=ALLOW,
    )
    hue: float = key(
        0.0, "hue shift drawn from [-x, x] per image (RGB)", ge=0, le=0.5, resume=ALLOW
    )
    random_erasing: float = key(
        0.0, "probability of erasing one random box per image", ge=0, le=1, resume=ALLOW
    )
    mixup_alpha: float = key(0.0, "> 0: mixup with Beta(alpha, alpha) weights", ge=0, resume=ALLOW)
    cutmix_alpha: float = key(0.0, "> 0: CutMix with Beta(alpha, alpha) areas", ge=0, resume=ALLOW)
    order: Optional[List[str]] = key(
        None,
        "the ops after the geometry, in the order they run (null: their default order); "
        "those on normalized images (random_erasing, mix) go last",
        resume=ALLOW,
    )


# The options of optim= and sched= (their YAML files), each built by name (optim.OPTIMIZERS,
# optim.SCHEDULES) and declared below (GROUP_OPTIONS); tests/test_config.py holds the four equal
OPTIMIZER_NAMES = tuple(config_options("optim"))
SCHEDULE_NAMES = tuple(config_options("sched"))


def _optimizer(name):
    # another optimizer's state would not fit: momentum buffers are not Adam moments
    return key(name, "the optimizer (optim=<option>)", choices=OPTIMIZER_NAMES, resume=FIXED)


def _schedule(name):
    return key(
        name, "the learning-rate schedule (sched=<option>)", choices=SCHEDULE_NAMES, resume=REPLAN
    )


@dataclass
class OptimConfig:
    """Keys of every optimizer; null leaves torch's default."""

    name: str = _optimizer(MISSING)
    # a number, or `find`: train() replaces it with the LR finder's suggestion before anything
    # uses it, so that every stored config (checkpoints, .hydra/) holds the number
    lr: Any = key(
        MISSING,
        "learning rate, or find: the suggestion of the LR range test (lr_finder.*), run first",
        kinds=(float, str),
        pattern="find",
        gt=0,
        what="a number > 0, or find",
        resume=REPLAN,
    )
    weight_decay: float = key(
        0.0, "L2 / decoupled weight decay (not on biases and norm weights)", ge=0, resume=ALLOW
    )
    fused: Any = key(
        "auto",
        "fused update kernels: auto | true | false",
        choices=("auto", True, False),
        resume=FREE,
    )
    norm_lr_scale: float = key(
        1.0,
        "lr factor of the normalization layers' weights and biases (airbench: 64 for its "
        "BatchNorm biases)",
        gt=0,
        resume=REPLAN,
    )


@dataclass
class SGDConfig(OptimConfig):
    name: str = _optimizer("sgd")
    momentum: float = key(0.0, "momentum factor", ge=0, lt=1, resume=ALLOW)
    nesterov: Any = flag(False, "Nesterov momentum (needs momentum > 0)", resume=ALLOW)


@dataclass
class AdamConfig(OptimConfig):
    name: str = _optimizer("adam")
    betas: List[float] = key(
        factory=lambda: [0.9, 0.999],
        help="coefficients of the running averages of the gradient and its square",
        ge=0,
        lt=1,
        length=(2,),
        resume=ALLOW,
    )
    eps: float = key(1e-8, "term added to the denominator", gt=0, resume=ALLOW)


@dataclass
class AdamWConfig(AdamConfig):
    """AdamW: Adam's keys, with decoupled weight decay."""

    name: str = _optimizer("adamw")


@dataclass
class SchedConfig:
    """Keys of every schedule; each option adds its own."""

    name: str = _schedule(MISSING)
    interval: str = key(
        "epoch",
        "step the schedule after every batch (step) or epoch",
        choices=("step", "epoch"),
        resume=REPLAN,
    )
    warmup_epochs: float = key(
        0.0, "linear warmup from lr/100 to lr over this many epochs", ge=0, resume=REPLAN
    )


@dataclass
class CosineConfig(SchedConfig):
    name: str = _schedule("cosine")
    T_max: Optional[int] = key(
        None, "steps of the cosine (null: the rest of the run)", ge=1, resume=REPLAN
    )
    eta_min: float = key(0.0, "lr at the end", ge=0, resume=REPLAN)


@dataclass
class StepConfig(SchedConfig):
    name: str = _schedule("step")
    step_size: int = key(
        7, "epochs (steps with interval=step) between two decays", ge=1, resume=REPLAN
    )
    gamma: float = key(0.1, "factor of each decay", gt=0, le=1, resume=REPLAN)


@dataclass
class MultiStepConfig(SchedConfig):
    name: str = _schedule("multistep")
    milestones: List[float] = key(
        factory=lambda: [0.5, 0.75],
        help="where to decay: fractions of the run (< 1) or epoch numbers",
        ge=0,
        resume=REPLAN,
    )
    gamma: float = key(0.1, "factor of each decay", gt=0, le=1, resume=REPLAN)


@dataclass
class OneCycleConfig(SchedConfig):
    name: str = _schedule("onecycle")
    max_lr: Optional[float] = key(None, "peak lr (null: optim.lr)", gt=0, resume=REPLAN)
    total_steps: Optional[int] = key(
        None, "length of the cycle (null: the whole run)", ge=1, resume=REPLAN
    )
    pct_start: float = key(
        0.25, "fraction of the cycle spent warming up", gt=0, lt=1, resume=REPLAN
    )
    anneal_strategy: str = key(
        "cos", "shape of the annealing", choices=("cos", "linear"), resume=REPLAN
    )
    div_factor: float = key(25.0, "the cycle starts at max_lr / div_factor", gt=0, resume=REPLAN)
    final_div_factor: float = key(
        1e4, "it ends at max_lr / div_factor / final_div_factor", gt=0, resume=REPLAN
    )
    cycle_momentum: Any = flag(
        True,
        "cycle the momentum (Adam: beta1) inversely to the lr, between 0.85 and 0.95; "
        "false: optim.momentum throughout",
        resume=REPLAN,
    )


@dataclass
class ConstantConfig(SchedConfig):
    name: str = _schedule("none")
    factor: float = key(1.0, "lr factor until total_iters", gt=0, le=1, resume=REPLAN)
    total_iters: int = key(0, "steps with the factor applied", ge=0, resume=REPLAN)


# --------------------------------------------------------------------------- train
@dataclass
class LossConfig:
    class_weights: Any = key(
        None,
        "per-class weights of the cross-entropy: null (none), balanced (n_images / "
        "(n_classes * images of the class) of the training split) or [w0, w1, ...] (one "
        "per class)",
        kinds=(None, str, list),  # which string and which numbers: _check_class_weights
        resume=ALLOW,
    )


@dataclass
class CheckpointConfig:
    keep_top_k: int = key(0, "also keep epoch_NNN.pt of the k best epochs", ge=0, resume=FREE)


@dataclass
class EmaConfig:
    decay: Optional[float] = key(
        None,
        "exponential moving average of the weights, e.g. 0.999 (null: off)",
        gt=0,
        lt=1,
        resume=FIXED,
    )


@dataclass
class LrFinderConfig:
    """The LR range test of `lr_find=true` and `optim.lr=find` (Smith 2017, fastai's lr_find):
    the lr grows exponentially from start_lr to end_lr over num_it steps on a copy of the
    model, and stops early once the smoothed loss passes stop_factor times its minimum."""

    start_lr: float = key(1e-7, "lr of the first step", gt=0, resume=FREE)
    end_lr: float = key(10.0, "lr of the last step (> start_lr)", gt=0, resume=FREE)
    num_it: int = key(
        200,
        "training steps of the test (past the end of an epoch it goes on into the next)",
        ge=10,
        le=100_000,
        resume=FREE,
    )
    stop_factor: Optional[float] = key(
        4.0,
        "stop once the smoothed loss passes this multiple of its minimum (null: all num_it steps)",
        gt=1,
        resume=FREE,
    )
    smoothing: float = key(
        0.98,
        "factor of the loss's moving average (bias-corrected; 0: no smoothing)",
        ge=0,
        lt=1,
        resume=FREE,
    )
    rule: str = key(
        "valley",
        "the suggestion used (optim.lr=find) and printed: fastai's valley, or the steepest fall",
        choices=("valley", "steep"),
        resume=FREE,
    )


@dataclass
class EarlyStopConfig:
    patience: Optional[int] = key(
        None, "stop after this many epochs without a better val accuracy", ge=1, resume=FREE
    )


DEVICE = r"auto|cpu|mps|cuda(:\d+)?"
# test-time augmentation of cnneval and of training's final test (cnntrain/tta.py)
TTA_MODES = (None, "flip", "flip_shift")


@dataclass
class RuntimeConfig:
    """Keys shared by every tool."""

    device: str = key("auto", "auto | cpu | cuda | cuda:N | mps", pattern=DEVICE, resume=FREE)
    debug: Any = flag(
        False, "show the full traceback of an error (as HYDRA_FULL_ERROR=1)", resume=FREE
    )


@dataclass
class TrainConfig(RuntimeConfig):
    name: Optional[str] = key(
        None, "the run's name in its folder and in TensorBoard (null: <model>_<data>)", resume=FREE
    )
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: Any = None
    sched: Any = None
    aug: AugConfig = field(default_factory=AugConfig)
    epochs: int = key(10, "number of training epochs", ge=1, resume=REPLAN)
    seed: int = key(42, "seed of every random generator", ge=0, lt=2**32, resume=ALLOW)
    amp: Any = flag(
        False,
        "mixed precision: bf16 where the GPU has it natively, else fp16 + GradScaler",
        resume=FREE,
    )
    amp_dtype: str = key("auto", "precision of amp", choices=("auto", "bf16", "fp16"), resume=FREE)
    channels_last: Any = key(
        "auto",
        "NHWC memory format: auto | true | false",
        choices=("auto", True, False),
        resume=FREE,
    )
    compile: Any = flag(False, "wrap the model with torch.compile", resume=FREE)
    sync_batchnorm: Any = flag(
        False, "under torchrun: BatchNorm statistics over all ranks", resume=FREE
    )
    deterministic: Any = flag(
        False, "deterministic algorithms (and no cudnn.benchmark)", resume=FREE
    )
    label_smoothing: float = key(
        0.0, "label smoothing of the cross-entropy", ge=0, lt=1, resume=ALLOW
    )
    loss: LossConfig = field(default_factory=LossConfig)
    grad_clip: Optional[float] = key(
        None, "max gradient L2 norm (null: no clipping)", gt=0, resume=ALLOW
    )
    resume: Optional[str] = key(
        None, "a last.pt to continue from, or auto (the run folder's last.pt)", resume=FREE
    )
    resume_allow_changes: List[str] = key(
        factory=list,
        help="settings a resumed run may change on purpose (e.g. [epochs], [optim.lr], [sched])",
        resume=FREE,
    )
    on_nan: str = key(
        "stop", "non-finite loss: stop or skip_batch", choices=("stop", "skip_batch"), resume=FREE
    )
    max_steps_per_epoch: Optional[int] = key(
        None, "cap on training batches per epoch", ge=1, resume=EPOCH
    )
    max_eval_steps: Optional[int] = key(None, "cap on validation / test batches", ge=1, resume=FREE)
    tta: Optional[str] = key(
        None,
        "test-time augmentation of the final test (results.json's test_acc): flip, flip_shift",
        choices=TTA_MODES,
        resume=FREE,
    )
    summary: Any = flag(False, "print the model summary and exit", resume=FREE)
    lr_find: Any = flag(
        False,
        "run the LR range test (lr_finder.*), write lr_find.png and lr_find.json, print the "
        "suggested optim.lr and exit, training nothing",
        resume=FREE,
    )
    optimized_metric: Optional[str] = key(
        None,
        "a results.json key returned to a sweeper",
        choices=(
            None,
            "test_acc",
            "test_top5",
            "test_loss",
            "test_macro_f1",
            "test_balanced_acc",
            "best_val_acc",
        ),
        resume=FREE,
    )
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    lr_finder: LrFinderConfig = field(default_factory=LrFinderConfig)


# --------------------------------------------------------------------------- eval, predict, viz
@dataclass
class EvalDataConfig:
    """Overrides of the data settings stored in the checkpoint (null: as trained)."""

    root: Optional[str] = key(None, "where the dataset lives now")
    batch_size: Optional[int] = key(None, "images per batch", ge=1)
    num_workers: Optional[int] = key(
        None, "image folders: processes decoding images into the cache", ge=0, le=256
    )
    cache_dir: Optional[str] = key(
        None, "image folders: where they are decoded to (null: as trained, or the default)"
    )
    memory_budget_gb: Optional[float] = key(None, "images kept on the device up to this size", ge=0)
    download: Any = flag(False, "fetch missing files with torchvision")
    skip_bad_images: Any = flag(None, "image folders: skip unreadable images (null: as trained)")


@dataclass
class EvalConfig(RuntimeConfig):
    ckpt: Any = key(
        MISSING, "a checkpoint, a run or multirun folder, or a [list]", kinds=(str, list)
    )
    split: str = key("test", "which split to evaluate", choices=("test", "val"))
    amp: Any = flag(False, "mixed precision")
    predictions: Any = flag(True, "also write predictions.csv")
    tta: Optional[str] = key(
        None,
        "test-time augmentation: flip (image + mirror), flip_shift (airbench's 6 views)",
        choices=TTA_MODES,
    )
    calibrate: Any = flag(
        False,
        "fit temperature scaling on the val split, stored in a copy beside the checkpoint "
        "(best.pt -> best.calibrated.pt)",
    )
    data: EvalDataConfig = field(default_factory=EvalDataConfig)


@dataclass
class PredictConfig(RuntimeConfig):
    # exactly one of the two (predict.py checks): Hydra reads `model=` as the model config group,
    # so cnnpredict's command line turns model=FILE into exported=FILE (cli.py)
    ckpt: Optional[str] = key(
        None, "a checkpoint written by cnntrain (best.pt or last.pt); or model="
    )
    exported: Optional[str] = key(
        None,
        "an ONNX file written by cnnexport, run with onnxruntime "
        "alone; on the command line model=FILE.onnx",
    )
    inputs: Any = key(
        MISSING, "an image file, a folder, a quoted glob or a [list]", kinds=(str, list)
    )
    topk: int = key(5, "classes per image", ge=1)
    batch_size: int = key(64, "images per batch", ge=1)


@dataclass
class VizConfig(RuntimeConfig):
    ckpt: str = key(MISSING, "a checkpoint written by cnntrain (best.pt or last.pt)")
    inputs: Any = key(
        MISSING, "an image file, a folder, a quoted glob or a [list]", kinds=(str, list)
    )
    layers: Optional[List[str]] = key(
        None, "module names for the feature maps (null: one per stage)"
    )
    target_class: Any = key(
        None, "class name or index for Grad-CAM (null: the predicted class)", kinds=(None, str, int)
    )
    max_images: int = key(8, "the first N input images", ge=1)


EXPORT_FORMATS = ("onnx", "torchscript", "exported_program")


@dataclass
class ExportConfig(RuntimeConfig):
    ckpt: str = key(MISSING, "a checkpoint written by cnntrain (best.pt or last.pt)")
    format: Any = key(
        "onnx",
        "the file format, or a list of them ('[onnx,torchscript]')",
        kinds=(str, list),
        choices=EXPORT_FORMATS,
    )
    layout: str = key(
        "nchw",
        "the exported model's input layout: nchw, or nhwc as image decoders give pixels",
        choices=("nchw", "nhwc"),
    )
    input: str = key(
        "uint8",
        "the exported model's input: uint8 pixels 0..255, or float 0..1 "
        "(normalized inside the graph either way)",
        choices=("uint8", "float"),
    )
    softmax: Any = flag(False, "output probabilities instead of logits")
    verify_images: int = key(
        64, "test images the exported file is checked on against cnntrain's own predictions", ge=1
    )
    inputs: Any = key(
        None,
        "image files to check on instead of the test split (a file, a folder, "
        "a quoted glob or a [list])",
        kinds=(None, str, list),
    )
    atol: float = key(
        1e-3,
        "largest allowed difference of an output (logit or probability) "
        "between the exported file and cnntrain",
        gt=0,
    )
    benchmark: Any = flag(
        False,
        "also measure latency (batch 1) and throughput (batch 64) of each "
        "format and of eager PyTorch",
    )
    device: str = key("cpu", "export, verification and benchmark run on the CPU", choices=("cpu",))
    data: EvalDataConfig = field(default_factory=EvalDataConfig)


APPS = {
    "train": TrainConfig,
    "eval": EvalConfig,
    "predict": PredictConfig,
    "viz": VizConfig,
    "export": ExportConfig,
}


def _by_name(*options: Any) -> dict[str, Any]:
    return {option.name: option for option in options}  # the declared default of its `name`


GROUP_OPTIONS = {
    "optim": _by_name(SGDConfig, AdamConfig, AdamWConfig),
    "sched": _by_name(CosineConfig, StepConfig, MultiStepConfig, OneCycleConfig, ConstantConfig),
}


def register() -> None:
    """Schemas as ConfigStore entries: `<app>_schema` extended by configs/<app>.yaml and
    `schema/<group>/<name>` extended by configs/<group>/<name>.yaml."""
    cs = ConfigStore.instance()
    for app, node in APPS.items():
        cs.store(name=f"{app}_schema", node=node)
    for group, options in GROUP_OPTIONS.items():
        for name, node in options.items():
            cs.store(group=f"schema/{group}", name=name, node=node)


register()


# --------------------------------------------------------------------------- checking
def _rules(f) -> dict:
    return {k: v for k, v in f.metadata.items() if k not in ("help", "resume", "what")}


def default(f):
    if f.default is not NO_DEFAULT and f.default is not MISSING:
        return f.default
    if f.default_factory is not NO_DEFAULT:
        return f.default_factory()
    return None


def show(value) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _allowed(rules: dict) -> str:
    parts = []
    if set(rules.get("choices", ())) - {None} == {True, False}:
        parts.append(" or ".join(show(c) for c in rules["choices"]))
    elif "choices" in rules:
        parts.append("one of " + ", ".join(show(c) for c in rules["choices"]))
    for op, word in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
        if op in rules:
            parts.append(f"{word} {rules[op]}")
    if "pattern" in rules:
        parts.append(rules["pattern"].replace("|", " | ").replace(r"(:\d+)?", "[:N]"))
    if "length" in rules:
        parts.append(f"a list of {' or '.join(map(str, rules['length']))} value(s)")
    return ", ".join(parts)


def _number_problem(value, rules: dict) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if rules.get("finite", True) and not math.isfinite(value):
        return True
    return (
        ("gt" in rules and not value > rules["gt"])
        or ("ge" in rules and not value >= rules["ge"])
        or ("lt" in rules and not value < rules["lt"])
        or ("le" in rules and not value <= rules["le"])
    )


def _fail(path: str, value, f, what: str) -> UserError:
    value = value if isinstance(value, str) else show(value)
    about = [f"default {show(default(f))}"] if default(f) is not None or f.default is None else []
    about += [f.metadata["help"]] if f.metadata.get("help") else []
    return UserError(f"{path}={value} is not allowed: it must be {what} ({'; '.join(about)})")


_KIND_NAMES = {
    None: "null",
    str: "a string",
    bool: "true/false",
    int: "an integer",
    float: "a number",
    list: "a list",
}


def _is_kind(value, kind) -> bool:
    if kind is None:
        return value is None
    if kind is list:
        return isinstance(value, (list, ListConfig))
    if kind is float:  # any number: optim.lr=1 is an lr too
        return type(value) in (int, float)
    return type(value) is kind  # bool is not an int here


def _check_value(path: str, value, f) -> None:
    rules, words = _rules(f), f.metadata.get("what")
    if not rules or value is None and "choices" not in rules and "kinds" not in rules:
        return
    if "kinds" in rules and not any(_is_kind(value, kind) for kind in rules["kinds"]):
        kinds = " or ".join(_KIND_NAMES[kind] for kind in rules["kinds"])
        raise _fail(path, value, f, words or kinds)
    # a list where one is declared (format=[onnx,torchscript]): each of its items is one of the
    # choices; anywhere else a list is one value, refused by choices like any other
    listed = isinstance(value, ListConfig) and list in rules.get("kinds", ())
    chosen = list(value) if listed else [value]
    if "choices" in rules and not all(
        any(type(v) is type(c) and v == c for c in rules["choices"]) for v in chosen
    ):
        raise _fail(path, value, f, _allowed(rules))
    if "pattern" in rules and isinstance(value, str) and not re.fullmatch(rules["pattern"], value):
        raise _fail(path, value, f, words or _allowed(rules))
    items = list(value) if isinstance(value, ListConfig) else [value]
    if isinstance(value, ListConfig) and "length" in rules and len(items) not in rules["length"]:
        raise _fail(path, value, f, _allowed(rules))
    if any(_number_problem(v, rules) for v in items):
        finite = all(math.isfinite(v) for v in items if isinstance(v, (int, float)))
        ranges = _allowed({k: v for k, v in rules.items() if k != "pattern"})  # the number's
        raise _fail(
            path, value, f, ", ".join(filter(None, [None if finite else "a finite number", ranges]))
        )


def check_node(node: DictConfig, prefix: str = "") -> None:
    """Every key of `node` (and below) against its declaration; missing mandatory values and
    keys that are not declared are errors too."""
    schema = OmegaConf.get_type(node)
    if not is_dataclass(schema):
        return
    declared = {f.name: f for f in fields(schema)}
    for name in node:
        if name not in declared:
            raise unknown_key(f"{prefix}{name!s}", *keys_of("train", f"{prefix}{name!s}", schema))
    for name, f in declared.items():
        path = f"{prefix}{name}"
        if OmegaConf.is_missing(node, name):
            raise UserError(f"{path} is required: {f.metadata.get('help', '')} (set {path}=...)")
        value = node[name]  # resolves interpolations: a failing one raises here
        if isinstance(value, DictConfig) and is_dataclass(OmegaConf.get_type(value)):
            check_node(value, f"{path}.")
        else:
            _check_value(path, value, f)


def unknown_key(path: str, declared, option: str = "") -> UserError:
    """A key that is not declared where it was given, with the closest one that is."""
    prefix, _, name = path.rpartition(".")
    known = [k for k in declared if not k.startswith("_")]
    # a spelled-out or abbreviated name (learning_rate for lr, wd for weight_decay) or a typo
    close = [k for k in known if _initials(k) == name or _initials(name) == k]
    close = close or difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    hint = (
        f"; did you mean {prefix + '.' if prefix else ''}{close[0]}?"
        if close and close[0] != name
        else ""
    )
    where = f"{prefix}={option}" if option else prefix
    return UserError(
        f"unknown key {path}{' for ' + where if option else ''}{hint} (the keys of "
        f"{where or 'the config'}: {', '.join(known)})"
    )


def _initials(name: str) -> str:
    return "".join(part[0] for part in name.split("_") if part) if "_" in name else ""


def check(cfg: DictConfig) -> None:
    """The composed config of any tool: every key in its declared type and range, then the
    rules that involve several keys."""
    check_node(cfg)
    if OmegaConf.get_type(cfg) is TrainConfig or "epochs" in cfg:
        _check_train(cfg)


def _check_train(cfg: DictConfig) -> None:
    data = cfg.data
    if data.name == "imagefolder" and data.root is None:
        raise UserError(
            "data=imagefolder needs data.root=/path/to/images "
            "(a folder with train/<class>/<image> and optional val/, test/)"
        )
    for kind in KINDS:
        _check_geometry(cfg.aug[kind], f"aug.{kind}.")
    if (data.mean is None) != (data.std is None) or (
        data.mean is not None and len(data.mean) != len(data.std)
    ):
        raise UserError(
            f"data.mean={show(data.mean)} and data.std={show(data.std)} must both be "
            "null or lists of the same length (1 value per channel)"
        )
    sched = cfg.sched
    for group, options in GROUP_OPTIONS.items():  # the option's keys and its name go together
        if OmegaConf.get_type(cfg[group]) is not options.get(cfg[group].name):
            raise UserError(
                f"{group}.name={cfg[group].name} does not go with the keys of the "
                f"{group} chosen; choose it with {group}={cfg[group].name}"
            )
    if sched.name == "onecycle" and sched.warmup_epochs:
        raise UserError(
            "sched=onecycle has its own warmup (sched.pct_start); set sched.warmup_epochs=0"
        )
    if sched.warmup_epochs and sched.warmup_epochs >= cfg.epochs:
        raise UserError(
            f"sched.warmup_epochs={sched.warmup_epochs} leaves nothing of epochs={cfg.epochs}; lower it"
        )
    if cfg.optim.get("nesterov") and not cfg.optim.get("momentum"):
        raise UserError(
            "optim.nesterov=true needs optim.momentum > 0 (or set optim.nesterov=false)"
        )
    _check_lr_finder(cfg)
    _check_class_weights(cfg.loss.class_weights)
    _check_allowed_changes(list(cfg.resume_allow_changes))


def _check_lr_finder(cfg: DictConfig) -> None:
    finder = cfg.get("lr_finder")
    if finder is None:  # a config not composed from the schema
        return
    if finder.start_lr >= finder.end_lr:
        raise UserError(
            f"lr_finder.start_lr={finder.start_lr} must be below lr_finder.end_lr="
            f"{finder.end_lr} (the lr grows from the one to the other)"
        )
    if cfg.lr_find and cfg.resume is not None:
        raise UserError(
            f"lr_find=true trains nothing, so it continues no run: leave out "
            f"resume={cfg.resume} (optim.lr=find on a new run finds the lr, then trains)"
        )
    if cfg.lr_find and cfg.optimized_metric is not None:
        raise UserError(
            f"lr_find=true trains nothing, so it has no optimized_metric={cfg.optimized_metric} "
            "to return to a sweeper; leave out optimized_metric= (and hparams_search=)"
        )


def _check_class_weights(weights) -> None:
    """loss.class_weights is null, balanced or a list of positive finite numbers; their count
    is checked against the data's classes once the data is read (imbalance.py)."""
    if weights is None or weights == "balanced":
        return
    if isinstance(weights, ListConfig) and all(
        isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w > 0
        for w in weights
    ):
        if len(weights):
            return
    raise UserError(
        f"loss.class_weights={show(weights)} is not allowed: it must be null, balanced or a "
        "list of positive numbers, one per class (e.g. loss.class_weights=[1,1,5])"
    )


def resume_class(path: str) -> str | None:
    """What a resume may do with the training key `path` (a leaf, or a key below one such as
    model.args.drop_rate): its declaration's `resume=`; None for a key not declared."""
    parts = path.split(".")
    for n in range(1, len(parts) + 1):
        f = declaration("train", ".".join(parts[:n]))
        if f is None:
            return None
        if "resume" in f.metadata:
            return f.metadata["resume"]
    return None


def resume_classes(path: str) -> set:
    """The resume classes of every key at or below `path` (a key, or a group such as sched)."""
    here = resume_class(path)
    if here is not None:
        return {here}
    below = _fields_at("train", path.split("."))
    return set().union(*(resume_classes(f"{path}.{name}") for name in below)) if below else set()


def _check_allowed_changes(keys: list[str]) -> None:
    """`resume_allow_changes`: keys or groups that a resume may change."""
    for path in keys:
        classes = resume_classes(path) if declaration("train", path) is not None else set()
        if not classes:
            raise UserError(
                f"resume_allow_changes=[{path}]: {path} is not a key of the config "
                "(e.g. epochs, optim.lr, data.batch_size, sched)"
            )
        if classes == {FIXED}:
            raise UserError(
                f"resume_allow_changes=[{path}]: {path} can never change when resuming (it "
                "defines the network or its data); start a new run instead"
            )
        if classes == {FREE}:
            raise UserError(
                f"resume_allow_changes=[{path}]: {path} may change on resume anyway; "
                "leave it out of the list"
            )


def _check_geometry(geo: DictConfig, prefix: str) -> None:
    for name in ("crop_scale", "scale"):
        if geo[name] is not None and geo[name][0] > geo[name][1]:
            raise UserError(f"{prefix}{name}={show(geo[name])}: give [min, max] with min <= max")
    if geo.crop_scale is None:
        return
    # the random-resized crop moves and scales the image itself
    clash = [name for name in ("shift", "degrees", "scale") if geo[name]]
    if clash:
        keys = " and ".join(prefix + name for name in clash)
        unset = " ".join(f"{prefix}{name}={'null' if name == 'scale' else 0}" for name in clash)
        raise UserError(
            f"{prefix}crop_scale replaces {keys} (the random-resized crop moves and "
            f"scales the image itself): set {unset}"
        )


def _fields_at(app: str, parts: list[str]) -> dict:
    """The declared keys of the node at `parts` (a path below `app`'s root): for `optim` and
    `sched`, whose declarations depend on the option chosen, those of every option."""
    node, options = APPS[app], None
    for part in parts:
        declared = _declared(node, options)
        f = declared.get(part)
        if f is None:
            return {}
        node, options = f.type, GROUP_OPTIONS.get(part) if node is TrainConfig else None
    return _declared(node, options)


def _declared(node, options) -> dict:
    if options:
        return {f.name: f for option in options.values() for f in fields(option)}
    return {f.name: f for f in fields(node)} if is_dataclass(node) else {}


def declared_keys(app: str, path: str) -> dict:
    """The keys declared next to `path` (its siblings), to suggest the closest one."""
    return _fields_at(app, path.split(".")[:-1])


def keys_of(app: str, path: str, node_type=None) -> tuple[dict, str]:
    """(the keys declared where `path` was given, the group option that declares them): those
    of `node_type` (the node's schema, e.g. AdamConfig for optim=adam) when known."""
    if is_dataclass(node_type):
        group = path.rpartition(".")[0]
        option = next(
            (name for name, schema in GROUP_OPTIONS.get(group, {}).items() if schema is node_type),
            "",
        )
        return {f.name: f for f in fields(node_type)}, option
    return declared_keys(app, path), ""


def declaration(app: str, path: str):
    """The field that declares `path` in `app`'s schema, or None."""
    return declared_keys(app, path).get(path.split(".")[-1])


_TYPE_NAMES: dict[Any, str] = {
    int: "an integer",
    float: "a number",
    bool: "true or false",
    str: "a string",
}


def type_error(app: str, path: str, value: str) -> UserError:
    """A value composition refused for its type, as one line with what is allowed."""
    f = declaration(app, path)
    if f is None:
        return UserError(f"{path}={value} is not allowed: wrong type")
    rules = _allowed(_rules(f))
    return _fail(path, value, f, _kind(f.type) + (f", {rules}" if rules else ""))


def _kind(t, unknown: str = "another value") -> str:
    """A declared type in words: int -> an integer, Optional[List[float]] -> null or a list of
    numbers."""
    args = getattr(t, "__args__", None) or ()
    if t in _TYPE_NAMES:
        return _TYPE_NAMES[t]
    if getattr(t, "__origin__", None) is list:
        item = _TYPE_NAMES.get(args[0], "a value") if args else "a value"
        return f"a list of {item.replace('an ', '').replace('a ', '')}s"
    if type(None) in args:
        return "null or " + _kind(next(a for a in args if a is not type(None)), "a value")
    return unknown


def container(cfg: DictConfig, resolve: bool = True) -> dict[str, Any]:
    """`cfg` as plain dicts and lists: OmegaConf.to_container, typed for a mapping."""
    return cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=resolve))


# --------------------------------------------------------------------------- --help
def help_table(app: str, cfg: DictConfig) -> str:
    """Every key of the composed config `cfg` with its value now and its meaning (and what is
    allowed) from the declarations, the top-level keys first, then one block per group: the
    part of `--help` that Hydra would print as a bare YAML dump."""
    values = container(cfg, resolve=False)
    values.pop("hydra", None)
    leaves = []

    def walk(node, prefix):
        for name, value in node.items():
            path = f"{prefix}{name}"
            if name in ("_target_", "_partial_"):
                continue
            if isinstance(value, dict) and value and _fields_at(app, path.split(".")):
                walk(value, path + ".")
            else:
                leaves.append((path, value))

    walk(values, "")
    leaves.sort(key=lambda leaf: "." in leaf[0])  # stable: the top-level keys, then the groups
    width = min(34, max(len(p) + len(show(v)) + 3 for p, v in leaves))
    lines, section = [], None
    for path, value in leaves:
        top = path.split(".")[0] if "." in path else "run"
        if top != section:
            section = top
            lines.append(f"{top}:")
        f = declaration(app, path)
        meaning, rules = (f.metadata.get("help", ""), _rules(f)) if f is not None else ("", {})
        allowed = (f.metadata.get("what") if f is not None else None) or _allowed(
            {k: v for k, v in rules.items() if k != "pattern"}
        )  # patterns: in the meaning
        if allowed:
            meaning += f" [{allowed}]"
        lines.append(f"  {f'{path}={show(value)}':<{width}}  {meaning}".rstrip())
    return "\n".join(lines)
