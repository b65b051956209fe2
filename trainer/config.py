"""The one typed configuration of a distillation run.

Nested dataclasses hold the defaults; a YAML preset (``trainer/configs/*.yaml``) and dotted
command-line overrides (``optim.lr=3e-4``) are merged on top by OmegaConf, which rejects unknown
keys and values of the wrong type. ``validate`` then checks what types cannot express (ranges,
choices, multiples), so every mistake is reported before a model is built.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from core.choices import (ALIGN_MODES, CROPS, DECODERS, METRIC_NAMES, STUDENT_MULTIPLE, TEACHER_MULTIPLE,
                          check_multiple, check_normalization)

# The choices come from the code that implements them (one list each, nothing to keep in step).
LABELED_CROPS = tuple(CROPS)
MIXED_PRECISION = ("no", "fp16", "bf16")


class ConfigError(ValueError):
    """A configuration mistake, reported in one line naming the key."""


@dataclass
class DataConfig:
    train_dir: str = "data/samples"
    val_dir: Optional[str] = None  # separate validation folder; else `val_fraction` of train_dir
    val_fraction: float = 0.2
    teacher_size: int = 518  # multiple of 14
    student_size: int = 256  # multiple of 32
    num_workers: int = 2
    crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333])
    hflip_prob: float = 0.5
    color_jitter: float = 0.2  # student view only; 0 disables
    labeled_dir: Optional[str] = None  # images/ + depth/ with ground truth, for evaluation
    labeled_crop: Optional[str] = None  # eigen_nyu | garg_kitti | eigen_kitti
    labeled_min_depth: float = 1e-3
    labeled_max_depth: float = 10.0
    labeled_depth_scale: float = 1000.0  # 16-bit PNG units per metre
    # A folder (or fsspec URL: s3://, gs://, https://) written by `python -m trainer.prepare_shards`:
    # training and validation photos come from its shards instead of train_dir / val_dir.
    shards: Optional[str] = None
    # Where shard photos are decoded and augmented: "workers" (the DataLoader workers, on the CPU),
    # "device" (where the step runs: nvJPEG and CUDA kernels on a GPU), "auto" (device on a GPU).
    decode_on: str = "auto"


@dataclass
class TeacherConfig:
    # Hub id, local directory, or "tiny" (random weights, for tests and the offline demo).
    name: str = "depth-anything/Depth-Anything-V2-Small-hf"
    # Backbone layers to distil from; None means the layers the teacher's own neck reads.
    feature_layers: Optional[list[int]] = None


@dataclass
class StudentConfig:
    backbone: str = "mobilevit_xs"  # any timm model with features_only support
    pretrained: bool = True  # ImageNet weights from the hub through timm
    decoder: str = "lean"  # lean | dpt (the first student's MiniDPT); see modeling/decoder.py
    # None: the preset's own (lean 96 / 16, dpt 64 / 32). lean narrows towards the fine stages
    # (decoder_width is its stride-32 width); dpt uses decoder_width at every stage.
    decoder_width: Optional[int] = None
    head_width: Optional[int] = None


@dataclass
class LossWeights:
    # Depth Anything V2's relative students learn with the scale-and-shift-invariant loss and
    # gradient matching (the teacher's own objective), not SILog, which is its metric fine-tuning
    # loss: on the synthetic world, a student of 500 steps reaches test AbsRel 0.249 with ssi and
    # 0.272 with silog (bench/RESULTS.md, "The default loss").
    silog: float = 0.0
    ssi: float = 1.0
    gradient: float = 0.5
    pixel: float = 0.0
    feature: float = 0.1
    attention: float = 0.0


@dataclass
class DistillConfig:
    weights: LossWeights = field(default_factory=LossWeights)
    normalization: str = "median_mad"
    silog_lam: float = 0.85
    gradient_scales: int = 4
    feature_kind: str = "l1"  # l1 | cosine
    ssi_kind: str = "l1"  # l1 | mse
    pixel_kind: str = "mse"  # mse | l1
    # Student encoder stages (0 = stride 4 ... 3 = stride 32) matched, in order, with the
    # teacher's feature layers for the feature and attention terms.
    student_stages: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    # Folder written by `python -m trainer.train.cache_teacher`: depth targets are read from it instead
    # of running the teacher. Feature/attention terms then read the teacher's feature maps from the
    # cache too ("stored": the writer stores them), run the live teacher's backbone ("live"), or are
    # dropped ("drop"; not "off", which YAML reads as false).
    teacher_cache: Optional[str] = None
    cache_features: str = "stored"


@dataclass
class OptimConfig:
    lr: float = 5e-4  # decoder learning rate
    encoder_lr_mult: float = 0.2  # encoder lr = lr * this (a pretrained encoder moves slower)
    adapter_lr_mult: float = 1.0  # feature adapters lr = lr * this
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 100
    min_lr_ratio: float = 0.01  # cosine decays to lr * this
    grad_clip: float = 1.0  # 0 disables
    grad_accum_steps: int = 1


@dataclass
class TrainConfig:
    epochs: int = 10
    max_steps: Optional[int] = None  # optimizer steps; overrides epochs when set
    batch_size: int = 8  # per process
    save_every: int = 500  # steps between full training states
    keep_last: int = 3  # training states kept on disk
    mixed_precision: Optional[str] = None  # None: whatever `accelerate config` chose
    deterministic: bool = False
    channels_last: bool = False
    compile: bool = False
    max_nonfinite_steps: int = 20  # consecutive skipped steps before giving up
    # How long a process waits for its peers (joining the group, any collective) before the run
    # ends with a message: a dead peer on another node must not leave the others hanging forever.
    # Longer than the slowest save or evaluation that one process does while the others wait.
    process_group_timeout_s: int = 1800


@dataclass
class EvalConfig:
    every: Optional[int] = None  # steps; evaluation also runs after every epoch
    batch_size: int = 8  # per process
    # Relative depth is compared after aligning the student to the reference (see trainer/evaluate/metrics.py).
    align: str = "scale_shift"
    best_metric: str = "abs_rel"  # on the labeled set when there is one, else against the teacher


@dataclass
class LogConfig:
    log_every: int = 10
    image_every: int = 200
    num_images: int = 4


@dataclass
class ExportConfig:
    enabled: bool = True
    opset: int = 18
    atol: float = 1e-3  # max abs difference onnxruntime vs PyTorch that still passes


@dataclass
class Config:
    run_name: str = "distill"
    output_dir: Optional[str] = None  # default runs/<run_name>
    seed: int = 42
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else Path("runs") / self.run_name


def _valid_keys(obj_type: Any) -> str:
    if obj_type is None or not dataclasses.is_dataclass(obj_type):
        return ""
    return ", ".join(f.name for f in dataclasses.fields(obj_type))


def _friendly(error: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(error, "full_key", "") or "?"
    first_line = str(error).splitlines()[0]
    if isinstance(error, ConfigKeyError):
        valid = _valid_keys(getattr(error, "object_type", None))
        return ConfigError(f"unknown config key '{key}' ({source}); valid keys here: {valid}")
    return ConfigError(f"bad value for config key '{key}' ({source}): {first_line}")


def _yaml_error(error: yaml.YAMLError, source: str, text: str = "") -> ConfigError:
    """PyYAML's multi-line report -> one line with the position (1-based) and the problem."""
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    lines = text.splitlines()
    tab = mark is not None and mark.line < len(lines) and "\t" in lines[mark.line]
    hint = " (a tab: YAML indents with spaces only)" if tab else ""
    return ConfigError(f"{source} is not valid YAML{where}: {problem}{hint}")


def _read_yaml(path: Path) -> DictConfig:
    try:
        text = path.read_text()
        loaded = OmegaConf.create(text)
    except yaml.YAMLError as error:
        raise _yaml_error(error, str(path), text) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read config file {path} ({type(error).__name__}: {error})") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path} must hold sections and keys (e.g. 'optim:' then '  lr: 3e-4') at the "
                          f"top level, not a list")
    return loaded


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    """Defaults < YAML file < dotted overrides, then validated."""
    merged = OmegaConf.structured(Config)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            merged = OmegaConf.merge(merged, _read_yaml(path))
        except OmegaConfBaseException as error:
            raise _friendly(error, str(path)) from None
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as error:
            raise _friendly(error, f"override '{item}'") from None
        except yaml.YAMLError as error:
            raise _yaml_error(error, f"override '{item}'") from None
    config = OmegaConf.to_object(merged)
    validate(config)
    return config


# What a resumed run may change: its length, how often it logs, evaluates and saves, and the
# resources it uses. Anything else (models, sizes, data, losses, optimizer, seed) would make the
# resumed run a different run from the one whose state it loads.
RESUMABLE_KEYS = ("run_name", "output_dir", "train.epochs", "train.max_steps", "train.save_every",
                  "train.keep_last", "train.max_nonfinite_steps", "train.compile", "train.process_group_timeout_s",
                  "data.num_workers", "data.decode_on",
                  "eval.every", "eval.batch_size", "log.", "export.")


def _resumable(key: str) -> bool:
    return any(key == allowed or (allowed.endswith(".") and key.startswith(allowed)) for allowed in RESUMABLE_KEYS)


def resume_config(saved: Path, overrides: list[str],
                  given: Optional[Config] = None) -> tuple[Config, list[str], list[str]]:
    """The configuration of a resumed run: the run's saved `config.yaml` plus the command-line
    overrides that `RESUMABLE_KEYS` allows. Returns (config, changes applied as 'key: old -> new',
    keys in which `given`, the --config file re-read now, differs from the saved run and is ignored)."""
    if not Path(saved).is_file():
        raise ConfigError(f"--resume: the run's configuration {saved} is missing; cannot resume")
    implied = _implied_by_older_versions(saved)
    before = flat_hparams(load_config(saved, implied))
    config = load_config(saved, [*implied, *overrides])
    after = flat_hparams(config)
    changed = [key for key in after if after[key] != before.get(key)]
    refused = [key for key in changed if not _resumable(key)]
    if refused:
        key = refused[0]
        raise ConfigError(f"--resume: {key}={after[key]} would change the run (it was trained with {key}="
                          f"{before.get(key)}); resume without it, or start a new run (another run_name) to "
                          f"change it. A resume may change only: {', '.join(RESUMABLE_KEYS)}")
    changes = [f"{key}: {before.get(key)} -> {after[key]}" for key in changed]
    ignored = []
    if given is not None:
        overridden = {item.partition("=")[0] for item in overrides}
        now = flat_hparams(given)
        ignored = [key for key in now if now[key] != before.get(key) and key not in overridden
                   and key not in ("run_name", "output_dir")]
    return config, changes, ignored


def _implied_by_older_versions(saved: Path) -> list[str]:
    """Overrides that keep a run saved by an older version training what it trained: runs saved
    before decoders had names (no student.decoder) were all MiniDPT, today's `dpt`."""
    try:
        student = (yaml.safe_load(Path(saved).read_text(encoding="utf-8")) or {}).get("student") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return []  # load_config reports what is wrong with the file
    return [] if "decoder" in student else ["student.decoder=dpt"]


CACHE_FEATURES = ("stored", "live", "drop")


def feature_terms_on(cfg: Config) -> bool:
    """The recipe matches the teacher's features (feature or attention term)."""
    return cfg.distill.weights.feature > 0 or cfg.distill.weights.attention > 0


def cache_stores_features(cfg: Config) -> bool:
    """A teacher cache written for this recipe holds the teacher's feature maps beside its depth."""
    return feature_terms_on(cfg) and cfg.distill.cache_features == "stored"


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"bad value for config key '{key}': {message}")


def _check_choice(value: Any, key: str, choices: tuple) -> None:
    _check(value in choices, key, f"{value!r} is not one of {', '.join(map(str, choices))}")


def validate(cfg: Config) -> None:
    """Range and choice checks that the types cannot express."""
    d, o, t = cfg.data, cfg.optim, cfg.train
    # The data pipeline owns the rule (14 = the teacher's patch, 32 = the student's deepest stride).
    for key, value, multiple in (("data.teacher_size", d.teacher_size, TEACHER_MULTIPLE),
                                 ("data.student_size", d.student_size, STUDENT_MULTIPLE)):
        try:
            check_multiple(key.split(".")[1], value, multiple)
        except ValueError as error:
            raise ConfigError(f"bad value for config key '{key}': {error}") from None
    _check(0.0 <= d.val_fraction < 1.0, "data.val_fraction", f"{d.val_fraction} must be in [0, 1)")
    _check(d.num_workers >= 0, "data.num_workers", "must be >= 0")
    _check(len(d.crop_scale) == 2 and 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1, "data.crop_scale",
           f"{d.crop_scale} must be [min, max] with 0 < min <= max <= 1")
    _check(len(d.crop_ratio) == 2 and 0 < d.crop_ratio[0] <= d.crop_ratio[1], "data.crop_ratio",
           f"{d.crop_ratio} must be [min, max] with 0 < min <= max")
    _check(0.0 <= d.hflip_prob <= 1.0, "data.hflip_prob", "must be in [0, 1]")
    _check(0.0 <= d.color_jitter < 1.0, "data.color_jitter", "must be in [0, 1)")
    if d.labeled_crop is not None:
        _check_choice(d.labeled_crop, "data.labeled_crop", LABELED_CROPS)
    _check(0 < d.labeled_min_depth < d.labeled_max_depth, "data.labeled_min_depth",
           "must be > 0 and below data.labeled_max_depth")
    _check(d.labeled_depth_scale > 0, "data.labeled_depth_scale", "must be > 0")
    _check_choice(d.decode_on, "data.decode_on", ("auto", "workers", "device"))
    _check(d.decode_on != "device" or d.shards is not None, "data.decode_on",
           "'device' needs data.shards (a folder's photos, of any format, are decoded in the workers); "
           "write shards with `python -m trainer.prepare_shards`")
    _check(d.shards is None or cfg.distill.teacher_cache is None, "data.shards",
           "training from shards with distill.teacher_cache is not supported yet; set one of the two")

    _check(bool(cfg.teacher.name), "teacher.name", "must be a hub id, a local directory or 'tiny'")
    _check_choice(cfg.student.decoder, "student.decoder", DECODERS)
    for key in ("decoder_width", "head_width"):
        value = getattr(cfg.student, key)
        _check(value is None or value > 0, f"student.{key}", f"{value} must be > 0 (or null: the preset's own)")

    ds = cfg.distill
    try:
        check_normalization(ds.normalization)
    except ValueError as error:
        raise ConfigError(f"bad value for config key 'distill.normalization': {error}") from None
    _check_choice(ds.feature_kind, "distill.feature_kind", ("l1", "cosine"))
    _check_choice(ds.ssi_kind, "distill.ssi_kind", ("l1", "mse"))
    _check_choice(ds.pixel_kind, "distill.pixel_kind", ("mse", "l1"))
    _check(0.0 <= ds.silog_lam <= 1.0, "distill.silog_lam", "must be in [0, 1]")
    _check_choice(ds.cache_features, "distill.cache_features", CACHE_FEATURES)
    _check(ds.gradient_scales >= 1, "distill.gradient_scales", "must be >= 1")
    weights = dataclasses.asdict(ds.weights)
    for name, weight in weights.items():
        _check(weight >= 0, f"distill.weights.{name}", f"{weight} must be >= 0")
    _check(sum(weights.values()) > 0, "distill.weights", "at least one loss weight must be > 0")
    _check(all(0 <= s <= 3 for s in ds.student_stages) and len(ds.student_stages) > 0,
           "distill.student_stages", f"{ds.student_stages} must be stage indices in 0..3")
    layers = cfg.teacher.feature_layers
    if layers is not None:
        _check(len(layers) == len(ds.student_stages), "teacher.feature_layers",
               f"{layers} must pair one-to-one with distill.student_stages {ds.student_stages}")

    _check(o.lr > 0, "optim.lr", f"{o.lr} must be > 0")
    _check(o.encoder_lr_mult >= 0 and o.adapter_lr_mult >= 0, "optim.encoder_lr_mult",
           "lr multipliers must be >= 0")
    _check(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas",
           f"{o.betas} must be two values in [0, 1)")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    _check(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
    _check(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables clipping)")
    _check(o.grad_accum_steps >= 1, "optim.grad_accum_steps", "must be >= 1")

    _check(t.epochs >= 1, "train.epochs", "must be >= 1")
    _check(t.max_steps is None or t.max_steps >= 1, "train.max_steps", "must be >= 1 or null")
    _check(t.batch_size >= 1, "train.batch_size", "must be >= 1")
    _check(t.save_every >= 1, "train.save_every", "must be >= 1")
    _check(t.keep_last >= 1, "train.keep_last", "must be >= 1")
    if t.mixed_precision is not None:
        _check_choice(t.mixed_precision, "train.mixed_precision", MIXED_PRECISION)
    _check(t.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", "must be >= 1")
    _check(t.process_group_timeout_s >= 10, "train.process_group_timeout_s", "must be >= 10 (seconds)")

    e = cfg.eval
    _check(e.every is None or e.every >= 1, "eval.every", "must be >= 1 or null")
    _check(e.batch_size >= 1, "eval.batch_size", "must be >= 1")
    _check_choice(e.align, "eval.align", ALIGN_MODES)
    _check_choice(e.best_metric, "eval.best_metric", METRIC_NAMES)

    _check(cfg.log.log_every >= 1, "log.log_every", "must be >= 1")
    _check(cfg.log.image_every >= 1, "log.image_every", "must be >= 1")
    _check(cfg.log.num_images >= 1, "log.num_images", "must be >= 1")
    _check(cfg.export.opset >= 17, "export.opset", f"{cfg.export.opset} must be >= 17")
    _check(cfg.export.atol > 0, "export.atol", "must be > 0")


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def flat_hparams(cfg: Config) -> dict[str, Any]:
    """`section.key -> value` with lists and None turned into strings: TensorBoard's hparams
    plugin accepts only int, float, str and bool."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(name + ".", value)
            elif isinstance(value, (int, float, str, bool)):
                flat[name] = value
            else:
                flat[name] = str(value)

    walk("", OmegaConf.to_container(OmegaConf.structured(cfg)))
    return flat
