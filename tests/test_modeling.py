"""modeling/: the frozen teacher's single pass, the student and its decoder, save/load round trips,
load errors that say what to do, and the parameter summary."""

from __future__ import annotations

import json
import re
import time

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO
from modeling import (DepthAnythingTeacher, MiniDPT, StudentDepthModel, StudentLoadError, TeacherLoadError,
                      TeacherOutput)


@pytest.fixture(scope="module")
def teacher_images() -> torch.Tensor:
    return torch.randn(2, 3, 56, 84, generator=torch.Generator().manual_seed(0))  # a 4 x 6 patch grid


@pytest.fixture(scope="module")
def student_images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def student_out(student, student_images) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One forward pass shared by the tests below: a student forward is the slow part here."""
    with torch.no_grad():
        return student(student_images, return_features=True)


# --- teacher -------------------------------------------------------------------------------------

def test_teacher_output_shapes(tiny_teacher, teacher_images):
    out = tiny_teacher(teacher_images)
    assert isinstance(out, TeacherOutput)
    assert out.disparity.shape == (2, 1, 56, 84)
    assert out.disparity.dtype == torch.float32
    assert (out.disparity >= 0).all()
    assert tiny_teacher.feature_layers == [1, 2, 3, 4]  # the neck's out_indices by default
    assert tiny_teacher.feature_channels == [32] * 4
    assert [tuple(f.shape) for f in out.features] == [(2, 32, 4, 6)] * 4


def test_teacher_output_size_resizes_disparity(tiny_teacher, teacher_images):
    full = tiny_teacher(teacher_images).disparity
    small = tiny_teacher(teacher_images, output_size=(32, 48)).disparity
    assert small.shape == (2, 1, 32, 48)
    expected = F.interpolate(full, size=(32, 48), mode="bilinear", align_corners=False)
    torch.testing.assert_close(small, expected)


def test_teacher_features_are_layernormed_tokens_in_row_major_order(tiny_teacher, teacher_images):
    out = tiny_teacher(teacher_images)
    with torch.no_grad():
        token_maps = tiny_teacher.model.backbone(teacher_images).feature_maps  # each (B, 1 + 24, C)
    assert len(token_maps) == 4 and token_maps[0].shape == (2, 25, 32)
    for k, feature in enumerate(out.features):
        for i in range(4):
            for j in range(6):
                assert torch.equal(feature[:, :, i, j], token_maps[k][:, 1 + i * 6 + j]), (k, i, j)


def test_teacher_disparity_matches_hf_forward(tiny_teacher, teacher_images):
    with torch.no_grad():
        expected = tiny_teacher.model(pixel_values=teacher_images).predicted_depth.unsqueeze(1)
    torch.testing.assert_close(tiny_teacher(teacher_images).disparity, expected, rtol=0, atol=1e-6)


def test_teacher_feature_layer_selection(tiny_teacher, teacher_images):
    picked = DepthAnythingTeacher(tiny_teacher.model, feature_layers=[2, 4])
    assert picked.feature_layers == [2, 4]
    assert picked.feature_channels == [32, 32]
    every = tiny_teacher(teacher_images).features
    chosen = picked(teacher_images).features
    assert len(chosen) == 2
    assert torch.equal(chosen[0], every[1]) and torch.equal(chosen[1], every[3])
    with pytest.raises(ValueError, match=re.escape("[1, 2, 3, 4]")):
        DepthAnythingTeacher(tiny_teacher.model, feature_layers=[5])


def test_teacher_rejects_size_off_the_patch_grid(tiny_teacher):
    with pytest.raises(ValueError, match="14"):
        tiny_teacher(torch.zeros(1, 3, 50, 84))


def test_teacher_is_frozen(tiny_teacher):
    assert all(not p.requires_grad for p in tiny_teacher.parameters())
    tiny_teacher.train()
    assert all(not m.training for m in tiny_teacher.modules())


def test_optimizer_holds_student_and_adapters_but_no_teacher(tiny_teacher, student):
    from trainer.config import load_config
    from trainer.train.distill import build_module, build_optimizer

    cfg = load_config(REPO / "trainer" / "configs" / "demo.yaml")
    module = build_module(cfg, student, tiny_teacher)
    optimizer = build_optimizer(cfg, module)
    in_groups = {id(p): group["name"] for group in optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in in_groups for p in tiny_teacher.parameters())
    adapter_params = list(module.criterion.parameters())
    assert adapter_params  # demo.yaml weighs the feature term, which owns the adapters
    assert {in_groups[id(p)] for p in adapter_params} <= {"adapters", "adapters_no_decay"}
    assert all(in_groups[id(p)].startswith("encoder") for p in student.encoder.parameters())
    assert all(in_groups[id(p)].startswith("decoder") for p in student.decoder.parameters())
    assert {g["name"] for g in optimizer.param_groups} >= {"encoder", "decoder", "adapters"}


def test_teacher_save_load_round_trip(tiny_teacher, teacher_images, tmp_path):
    tiny_teacher.save_pretrained(tmp_path / "teacher")
    loaded = DepthAnythingTeacher.from_pretrained(str(tmp_path / "teacher"))
    expected, got = tiny_teacher(teacher_images), loaded(teacher_images)
    assert torch.equal(got.disparity, expected.disparity)
    for a, b in zip(got.features, expected.features, strict=True):
        assert torch.equal(a, b)


def test_teacher_missing_local_dir():
    with pytest.raises(TeacherLoadError, match="does not exist"):
        DepthAnythingTeacher.from_pretrained("./no/such/dir")


def test_teacher_hub_id_offline_fails_fast_with_a_fix(tiny_teacher):
    start = time.perf_counter()
    with pytest.raises(TeacherLoadError) as caught:
        DepthAnythingTeacher.from_pretrained("depth-anything/Depth-Anything-V2-Small-hf")
    assert time.perf_counter() - start < 10
    message = str(caught.value)
    assert "\n" not in message
    for hint in ("local directory", "HF_HUB_OFFLINE", "demo.yaml"):
        assert hint in message


# --- student -------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(64, 96), (96, 64), (128, 160)])
def test_student_output_matches_input_size(student, size):
    images = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        disparity = student(images)
    assert disparity.shape == (1, 1, *size)
    assert (disparity >= 0).all()


def test_student_features(student, student_out):
    assert student.feature_channels == [48, 64, 80, 384]
    disparity, features = student_out
    assert disparity.shape == (2, 1, 64, 96)
    assert [tuple(f.shape) for f in features] == [(2, c, 64 // s, 96 // s)
                                                  for c, s in zip([48, 64, 80, 384], [4, 8, 16, 32])]


def test_default_student_is_phone_sized():
    params = sum(p.numel() for p in StudentDepthModel().parameters())
    print(f"default student: {params / 1e6:.3f} M parameters")
    assert params < 4_000_000


def test_student_save_load_round_trip(student, student_images, student_out, tmp_path):
    folder = tmp_path / "student"
    student.save_pretrained(folder)
    (folder / "README.md").unlink(missing_ok=True)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config == {"backbone": "mobilevit_xs", "decoder": "lean", "decoder_width": 16, "head_width": 8,
                      "input_size": None, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    loaded = StudentDepthModel.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(student_images), student_out[0])


def test_student_unknown_backbone():
    with pytest.raises(StudentLoadError, match="mobilevit_zz"):
        StudentDepthModel(backbone="mobilevit_zz")


def test_student_pretrained_offline_says_how_to_go_on():
    import timm
    from huggingface_hub import try_to_load_from_cache

    hub_id = timm.models.get_pretrained_cfg("mobilevit_xs").hf_hub_id
    if any(isinstance(try_to_load_from_cache(hub_id, f), str) for f in ("model.safetensors", "pytorch_model.bin")):
        pytest.skip(f"{hub_id} is in the local Hugging Face cache, so loading it offline succeeds")
    with pytest.raises(StudentLoadError, match=re.escape("student.pretrained=false")):
        StudentDepthModel.build(decoder_width=16, head_width=8, pretrained=True)


def test_student_other_backbone():
    torch.manual_seed(0)
    model = StudentDepthModel(backbone="mobilevitv2_050", decoder_width=16, head_width=8).eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        disparity, features = model(images, return_features=True)
    assert disparity.shape == (1, 1, 64, 64)
    assert model.feature_channels == [f.shape[1] for f in features] == [64, 128, 192, 256]


def test_student_channels_last_input(student, student_images, student_out):
    with torch.no_grad():
        got = student(student_images.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, student_out[0], rtol=0, atol=1e-5)


# --- decoder -------------------------------------------------------------------------------------

def test_minidpt_decodes_four_stages_to_input_size():
    channels = [8, 16, 24, 32]
    decoder = MiniDPT(channels, width=16, head_width=8)
    features = [torch.randn(2, c, 64 // s, 96 // s) for c, s in zip(channels, [4, 8, 16, 32])]
    disparity = decoder(features)
    assert disparity.shape == (2, 1, 64, 96)
    assert (disparity >= 0).all()
    # A last conv that outputs -10 everywhere must still give a positive map: softplus(-10).
    last = [m for m in decoder.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(-10.0)
        clamped = decoder(features)
    torch.testing.assert_close(clamped, torch.full_like(clamped, F.softplus(torch.tensor(-10.0)).item()))


def test_minidpt_needs_four_stages():
    with pytest.raises(ValueError, match="4 encoder stages, got 3"):
        MiniDPT([8, 16, 24])


# --- summary -------------------------------------------------------------------------------------

def test_summary_counts_parameters_and_flops_per_stage(capsys):
    from modeling.summary import main

    main(["--size", "256"])
    out = capsys.readouterr().out
    lean, dpt = out.split("mobilevit_xs + dpt decoder")
    rows = {name: (float(params), float(flops)) for name, params, flops in
            re.findall(r"^( *\S.*?)\s{2,}([\d.]+) M\s+([\d.]+)$", lean, re.M)}
    for stage in ("  stages_1 (to stride 4)", "  fusion at stride 4", "  fusion at stride 32",
                  "  head (upsampling to full size)"):
        assert rows[stage][1] > 0, stage
    # The budget for the default (lean) student at 256x256: the decoder costs at most the
    # encoder, the whole student at most ~2.7 GFLOPs (the dpt64 student: 5.45).
    assert rows["decoder"][1] <= rows["encoder"][1] and rows["student"][1] <= 2.7
    assert rows["encoder"][1] == pytest.approx(1.817, abs=0.01)
    assert re.search(r"^student\s+2\.605 M\s+5\.455$", dpt, re.M)
    assert "teacher (Depth-Anything-V2-Small, 24.785 M) at 518x518: 80.67 GFLOPs" in lean
    assert "at 252x252" in lean  # the teacher at the student's size, rounded to its patch


# --- export at any size ---------------------------------------------------------------------------

@pytest.mark.parametrize("backbone", ["mobilevit_xs", "mobilevitv2_050"])
def test_the_traceable_mobilevit_forward_is_timms_bit_for_bit(backbone):
    from modeling.traceable import input_multiple, traceable_any_size

    torch.manual_seed(0)
    model = StudentDepthModel(backbone=backbone).eval()
    images = torch.randn(2, 3, 128, 192, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(images)
        with traceable_any_size(model):
            got = model(images)
        after = model(images)
    assert torch.equal(got, expected) and torch.equal(after, expected)
    assert input_multiple(model.encoder) == 64  # 2x2 patches on the stride-32 map


def test_decoder_presets_and_widths():
    from modeling.decoder import LeanDecoder, build_decoder, lean_widths

    channels = [48, 64, 80, 384]
    assert lean_widths(96) == [32, 48, 64, 96]
    lean = build_decoder("lean", channels)
    assert isinstance(lean, LeanDecoder) and [c.out_channels for c in lean.reassemble] == [32, 48, 64, 96]
    dpt = build_decoder("dpt", channels)
    assert isinstance(dpt, MiniDPT) and [c.out_channels for c in dpt.reassemble] == [64] * 4
    with pytest.raises(ValueError, match="unknown decoder 'unet'; choose from lean, dpt"):
        build_decoder("unet", channels)
    features = [torch.randn(1, c, 64 // s, 96 // s) for c, s in zip(channels, [4, 8, 16, 32])]
    assert lean(features).shape == (1, 1, 64, 96) and (lean(features) > 0).all()


def test_a_half_precision_teacher_keeps_its_depth_head_in_fp32():
    """On a GPU with bf16 `place` casts backbone and neck only (done by hand here, on the CPU):
    the disparity is then not rounded to bf16's ~0.4% steps before the gradient loss sees it."""
    from modeling import DepthAnythingTeacher

    reference = DepthAnythingTeacher.tiny()
    teacher = DepthAnythingTeacher.tiny()
    teacher.model.backbone.to(torch.bfloat16)
    teacher.model.neck.to(torch.bfloat16)
    images = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        disparity = teacher(images).disparity
    expected = reference(images).disparity
    assert disparity.dtype == torch.float32 and teacher.dtype == torch.bfloat16
    assert next(teacher.model.head.parameters()).dtype == torch.float32
    assert not torch.equal(disparity, disparity.bfloat16().float())  # values between bf16's steps
    torch.testing.assert_close(disparity, expected, rtol=0.1, atol=0.05 * expected.abs().max().item())


@pytest.mark.parametrize("seed", [0, 5, 8, 10])
def test_the_tiny_teacher_gives_a_positive_varying_map_whatever_the_seed(seed):
    """Its final ReLU used to zero every pixel for some seeds (5, 8, 10; and 0 under transformers
    5.17, whose own init draws differently): the demo then distilled and scored nothing."""
    from data import EvalTransform, UnlabeledImageDataset, list_images
    from modeling import DepthAnythingTeacher

    from tests.conftest import SAMPLES

    dataset = UnlabeledImageDataset(list_images(SAMPLES)[:4], EvalTransform(70, 64))
    images = torch.stack([dataset[i]["teacher_image"] for i in range(4)])
    disparity = DepthAnythingTeacher.tiny(seed=seed)(images).disparity.flatten(1)
    assert ((disparity > 0).float().mean(dim=1) > 0.5).all()  # depth at most pixels of every photo
    assert (disparity.std(dim=1) > 1e-3 * disparity.mean(dim=1)).all()


def test_the_tiny_teacher_does_not_depend_on_how_transformers_draws_its_init(monkeypatch):
    """The same seed must give the same teacher whatever randomness transformers' own init
    consumes (it differs between releases: 5.17 and 5.24 gave different tiny teachers)."""
    from transformers import DepthAnythingForDepthEstimation

    from modeling import DepthAnythingTeacher

    expected = DepthAnythingTeacher.tiny().state_dict()
    original_init = DepthAnythingForDepthEstimation.__init__
    calls = []

    def init_drawing_more(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        torch.rand(1000)  # another release's init, drawing more
        calls.append(1)

    monkeypatch.setattr(DepthAnythingForDepthEstimation, "__init__", init_drawing_more)
    actual = DepthAnythingTeacher.tiny().state_dict()
    assert calls, "the teacher was built without DepthAnythingForDepthEstimation.__init__: the test proves nothing"
    assert all(torch.equal(actual[name], expected[name]) for name in expected)
