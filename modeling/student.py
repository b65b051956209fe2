"""The phone-sized student: a timm encoder (MobileViT-XS by default) and a DPT-style decoder
(`modeling.decoder`: the lean preset by default, or the first student's MiniDPT).

A trained student is a folder of two files, `config.json` (the constructor arguments, including
the input size it was trained at and the normalisation it expects) and `model.safetensors`.
Load one with `load_student(folder)`: it reads only that folder, never the network, and turns
every way the folder can be broken into one `StudentLoadError` line.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import timm
import torch
from huggingface_hub import PyTorchModelHubMixin
from safetensors.torch import load_file
from torch import nn

from core.normalization import IMAGENET_MEAN, IMAGENET_STD
from modeling.decoder import build_decoder
from core.errors import RunError, first_line
from core.student_folder import FOLDER_HINT, student_folder_problem

# Encoder stages fed to the decoder: strides 4, 8, 16, 32 (timm's feature index 0 is stride 2).
ENCODER_OUT_INDICES = (1, 2, 3, 4)
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class StudentLoadError(RunError):
    """The student (its backbone, pretrained weights or saved folder) could not be loaded; the
    message is one line that says why."""


def create_encoder(backbone: str, pretrained: bool = False) -> nn.Module:
    # is_model, not `in list_models()`: the list holds architecture names only, so it would refuse
    # valid tagged names such as 'mobilevit_xs.cvnets_in1k'.
    if not timm.is_model(backbone):
        close = timm.list_models(f"*{backbone.split('.')[0].split('_')[0]}*")[:8]
        raise StudentLoadError(f"timm does not know the student backbone '{backbone}'"
                               + (f"; similar names: {', '.join(close)}" if close else ""))
    architecture, _, tag = backbone.partition(".")
    if tag and backbone not in timm.list_pretrained(backbone):
        tagged = timm.list_pretrained(f"{architecture}.*")
        raise StudentLoadError(f"timm has no weights tagged '{tag}' for student backbone '{architecture}'; "
                               + (f"tagged names: {', '.join(tagged)}" if tagged else "use the name without a tag"))
    try:
        return timm.create_model(backbone, pretrained=pretrained, features_only=True,
                                 out_indices=ENCODER_OUT_INDICES)
    except (OSError, RuntimeError) as error:  # hub unreachable, weights missing
        if not pretrained:
            raise
        raise StudentLoadError(
            f"could not fetch pretrained weights for student backbone '{backbone}' ({first_line(error)}). "
            f"Fixes: student.pretrained=false (random init), HF_HUB_OFFLINE=1 with the weights in the "
            f"Hugging Face cache, or the offline demo config (trainer/configs/demo.yaml)") from None


# The folder's README.md. The mixin's default card says the model "has been pushed to the Hub",
# which a folder written by training never was.
STUDENT_MODEL_CARD = """
---
{{ card_data }}
---

A depth-distill student: relative inverse depth (disparity) from one RGB photo, distilled from
Depth Anything V2. `config.json` records its architecture, the input size it was trained at and the
normalisation it expects; load it with `modeling.load_student(folder)`, run it with
`python -m trainer.ship.predict`, ship it with `python -m trainer.ship.export`.
"""


class StudentDepthModel(nn.Module, PyTorchModelHubMixin, library_name="depth-distill",
                        tags=["depth-estimation", "knowledge-distillation"], model_card_template=STUDENT_MODEL_CARD):
    """Relative-depth (disparity) student. `save_pretrained(dir)` writes config.json and
    model.safetensors; `load_student(dir)` rebuilds it from those alone.

    The constructor arguments are what config.json records, so they never include `pretrained`:
    loading a saved student must not try to download ImageNet weights. Use `build` for that.
    `decoder` names the preset (`modeling.decoder.DECODERS`); `decoder_width` / `head_width` of
    None take the preset's own. `input_size` is the square side the student was trained at (None:
    not recorded, as in folders saved before it was); `image_mean` / `image_std` are the
    normalisation its input expects. They change nothing in the network: they tell export and
    prediction how to feed it.
    """

    def __init__(self, backbone: str = "mobilevit_xs", decoder: str = "lean", decoder_width: Optional[int] = None,
                 head_width: Optional[int] = None, input_size: Optional[int] = None,
                 image_mean: Sequence[float] = IMAGENET_MEAN, image_std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        self.encoder = create_encoder(backbone, pretrained=False)
        self.feature_channels: list[int] = self.encoder.feature_info.channels()
        self.decoder = build_decoder(decoder, self.feature_channels, decoder_width, head_width)
        self.input_size = input_size
        self.image_mean = [float(value) for value in image_mean]
        self.image_std = [float(value) for value in image_std]

    @classmethod
    def build(cls, backbone: str = "mobilevit_xs", decoder: str = "lean", decoder_width: Optional[int] = None,
              head_width: Optional[int] = None, pretrained: bool = False,
              input_size: Optional[int] = None) -> "StudentDepthModel":
        model = cls(backbone=backbone, decoder=decoder, decoder_width=decoder_width, head_width=head_width,
                    input_size=input_size)
        if pretrained:
            model.encoder.load_state_dict(create_encoder(backbone, pretrained=True).state_dict())
        return model

    def forward(self, images: torch.Tensor, return_features: bool = False):
        """images (B, 3, H, W), H and W multiples of 32 -> disparity (B, 1, H, W) [, features].

        With `return_features` the encoder stages (strides 4..32) come back too, from the same
        pass, for the feature and attention distillation terms.
        """
        features = self.encoder(images)
        disparity = self.decoder(features)
        if return_features:
            return disparity, features
        return disparity


def _read_config(folder: Path) -> dict:
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise StudentLoadError(f"{folder} is not a student folder (no {CONFIG_NAME}); {FOLDER_HINT}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:  # JSONDecodeError is a ValueError
        raise StudentLoadError(f"{config_path} is not valid JSON ({first_line(error)}); "
                               f"copy the folder again or save the student again") from None
    if not isinstance(config, dict):
        raise StudentLoadError(f"{config_path} holds {type(config).__name__}, not a student config (a JSON object)")
    return config


def _build_from_config(config: dict, config_path: Path) -> StudentDepthModel:
    # Keys this version does not know are ignored, as PyTorchModelHubMixin does, and keys it added
    # since (input_size, image_mean, image_std) take their defaults, so older folders still load.
    accepted = inspect.signature(StudentDepthModel.__init__).parameters
    known = {key: value for key, value in config.items() if key in accepted and key != "self"}
    # Folders saved before decoders had names all hold MiniDPT, whose widths they record.
    known.setdefault("decoder", "dpt")
    try:
        return StudentDepthModel(**known)
    except StudentLoadError as error:  # unknown backbone
        raise StudentLoadError(f"{config_path}: {error}") from None
    except Exception as error:  # a value of the wrong type or size
        raise StudentLoadError(f"{config_path} does not describe a student ({first_line(error)})") from None


def _load_weights(model: StudentDepthModel, weights_path: Path) -> None:
    try:
        state = load_file(str(weights_path), device="cpu")
    except Exception as error:  # SafetensorError for a bad header; truncated files raise others too
        raise StudentLoadError(f"{weights_path} is corrupt or truncated ({first_line(error)}); "
                               f"copy the folder again or save the student again") from None
    try:
        model.load_state_dict(state, strict=True)  # strict: a partial file must not load half a student
    except RuntimeError as error:
        raise StudentLoadError(f"{weights_path} does not match {CONFIG_NAME} beside it "
                               f"({first_line(error)})") from None


def load_student(path: str | Path) -> StudentDepthModel:
    """The student saved in folder `path` (config.json + model.safetensors), on the CPU, in eval mode.

    Reads only that folder: unlike `from_pretrained`, a path that is not a folder is never taken
    for a hub id. Raises StudentLoadError, with one line naming the file and the fix, for a path
    that is missing or not a folder, a missing or invalid config.json, a missing, corrupt or
    mismatched model.safetensors, or a backbone timm does not know.
    """
    folder = Path(path)
    problem = student_folder_problem(folder)
    if problem:
        raise StudentLoadError(problem)
    config = _read_config(folder)
    weights_path = folder / WEIGHTS_NAME
    if not weights_path.is_file():
        raise StudentLoadError(f"{folder} has {CONFIG_NAME} but no {WEIGHTS_NAME} (the weights); {FOLDER_HINT}")
    model = _build_from_config(config, folder / CONFIG_NAME)
    _load_weights(model, weights_path)
    return model.eval()
