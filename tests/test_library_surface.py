"""The parts of accelerate, torch, torchvision, timm and transformers that this project relies on
without their being public, documented API: each check fails naming the library, its version and
the place in this project that needs fixing, instead of a run breaking somewhere downstream.

Public replacements were taken where one exists (the student's config keys are read from
`inspect.signature`, not huggingface_hub's private `_hub_mixin_init_parameters`); what is left is
listed here and in README ("Tested versions")."""

from __future__ import annotations

import argparse
import importlib.metadata
import inspect
import warnings

import pytest
import torch
from torch import nn


def changed(library: str, where: str, what: str) -> str:
    return (f"{library} {importlib.metadata.version(library)} changed {what}, which {where} relies on: "
            f"adapt it, or keep {library} at the version in tested-versions.txt")


# --- accelerate --------------------------------------------------------------------------------

def test_accelerate_launch_parser_tells_the_launchers_flags():
    from accelerate.commands.launch import launch_command_parser

    from trainer.launch import TRAINER_FLAGS

    why = changed("accelerate", "trainer/launch.py split_arguments",
                  "launch_command_parser() or the argparse actions on it (._actions)")
    parser = launch_command_parser()
    assert isinstance(parser, argparse.ArgumentParser), why
    takes_value = {option: action.nargs != 0 for action in parser._actions for option in action.option_strings}
    for flag in ("--config_file", "--num_processes", "--num_machines", "--machine_rank", "--main_process_ip",
                 "--main_process_port", "--mixed_precision"):
        assert takes_value.get(flag) is True, why
    for flag in ("--multi_gpu", "--cpu", "-m"):
        assert takes_value.get(flag) is False, why
    # A trainer flag that the launcher also took would be swallowed by it.
    assert not (set(TRAINER_FLAGS) - {"-h", "--help"}) & set(takes_value), why


def test_accelerate_launch_runs_as_a_module_of_this_interpreter():
    """trainer.launch runs `python -m accelerate.commands.launch`: the published `accelerate-launch`
    command, with the interpreter (and so the environment) of the caller."""
    import accelerate.commands.launch as launch

    why = changed("accelerate", "trainer/launch.py ACCELERATE_LAUNCH", "where the accelerate-launch command lives")
    scripts = {e.name: e.value for e in importlib.metadata.distribution("accelerate").entry_points
               if e.group == "console_scripts"}
    assert scripts.get("accelerate-launch") == "accelerate.commands.launch:main", why
    assert 'if __name__ == "__main__":' in inspect.getsource(launch), why


def test_accelerate_gradient_state_and_prepared_loaders(tmp_path):
    from accelerate import Accelerator, DataLoaderConfiguration

    why = changed("accelerate", "trainer/train/loop.py (epoch ends, epoch seeding)",
                  "gradient_state.end_of_dataloader or a prepared loader's .dataset")
    dataset = list(range(4))
    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    loader = accelerator.prepare(torch.utils.data.DataLoader(dataset, batch_size=2, shuffle=True))
    assert loader.dataset is dataset, why
    ends = [accelerator.gradient_state.end_of_dataloader for _ in loader]
    assert ends == [False, True], why
    # trainer/train/faults.py and tests shadow save_state on the instance.
    assert inspect.isfunction(Accelerator.save_state), why


# --- torch ---------------------------------------------------------------------------------------

def test_torch_foreach_norm_flags_a_non_finite_gradient():
    why = changed("torch", "trainer/train/loop.py optimizer_step", "torch._foreach_norm")
    norms = torch._foreach_norm([torch.ones(4), torch.ones(9)])
    assert torch.equal(torch.stack(norms), torch.tensor([2.0, 3.0])), why
    assert not torch.isfinite(torch.stack(torch._foreach_norm([torch.ones(2), torch.tensor([float("nan")])])).sum())


def test_torch_elastic_reads_loglevel():
    import torch.distributed.elastic.utils.logging as elastic_logging

    why = changed("torch", "trainer/launch.py (LOGLEVEL quiets the launcher)", "the LOGLEVEL variable")
    assert "LOGLEVEL" in inspect.getsource(elastic_logging), why


def test_torch_pytree_logger_and_its_enum_warning():
    import torch.utils._pytree as pytree

    why = changed("torch", "modeling/__init__.py (a log filter)", "the torch.utils._pytree logger or its message")
    assert pytree.log.name == "torch.utils._pytree", why
    assert "is an Enum subclass" in inspect.getsource(pytree), why


def test_tensorboard_hparams_summaries_go_into_the_runs_own_writer(tmp_path):
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    why = changed("torch", "trainer/main.py log_hparams", "summary.hparams or SummaryWriter.file_writer")
    summaries = hparams({"a": 1.0}, {"m": 0.0})
    assert [s.value[0].metadata.plugin_data.plugin_name for s in summaries] == ["hparams"] * 3, why
    writer = SummaryWriter(str(tmp_path))
    assert callable(getattr(getattr(writer, "file_writer", None), "add_summary", None)), why
    for summary in summaries:
        writer.file_writer.add_summary(summary)
    writer.close()


def test_flop_counter_keys_name_the_module_path():
    from torch.utils.flop_counter import FlopCounterMode

    why = changed("torch", "modeling/summary.py", "FlopCounterMode.get_flop_counts()'s keys")
    with FlopCounterMode(display=False, depth=None) as counter:
        nn.Sequential(nn.Linear(2, 2))(torch.zeros(1, 2))
    assert set(counter.get_flop_counts()) == {"Global", "Sequential", "Sequential.0"}, why


class _Boom(ValueError):
    pass


class _FailingDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, index):
        raise _Boom("the one line")


def test_a_worker_error_comes_back_as_its_type_with_its_message_last():
    why = changed("torch", "trainer/benchmark/harness.py (a worker's BenchmarkDataError)",
                  "how DataLoader workers re-raise errors")
    with pytest.raises(_Boom) as caught:
        next(iter(torch.utils.data.DataLoader(_FailingDataset(), num_workers=1)))
    assert str(caught.value).strip().splitlines()[-1].endswith("_Boom: the one line"), why


def test_the_torchscript_onnx_exporter_still_exports(tmp_path):
    import onnx

    why = changed("torch", "trainer/ship/export.py", "torch.onnx.export(dynamo=False) (deprecated)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(nn.Linear(2, 2), (torch.zeros(1, 2),), str(tmp_path / "m.onnx"), dynamo=False,
                          input_names=["input"], dynamic_axes={"input": {0: "batch"}})
    assert onnx.load(str(tmp_path / "m.onnx")).graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch", why


# --- torchvision ---------------------------------------------------------------------------------

def test_color_jitter_drawn_then_applied_equals_one_call():
    from torchvision.transforms import v2

    why = changed("torchvision", "data/transforms.py (jitter drawn in the worker, applied on the device)",
                  "ColorJitter.make_params / .transform")
    jitter = v2.ColorJitter(0.4, 0.4, 0.4, 0.1)
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    torch.manual_seed(0)
    at_once = jitter(image)
    torch.manual_seed(0)
    assert torch.equal(jitter.transform(image, jitter.make_params([])), at_once), why


# --- timm ----------------------------------------------------------------------------------------

def test_timm_mobilevit_blocks_have_what_the_traceable_forward_reads():
    from timm.models.mobilevit import MobileVitBlock, MobileVitV2Block

    from modeling import StudentDepthModel
    from modeling.traceable import _patch_blocks

    why = changed("timm", "modeling/traceable.py", "MobileVitBlock / MobileVitV2Block")
    for block_type, names in ((MobileVitBlock, ("conv_fusion",)), (MobileVitV2Block, ())):
        block = block_type(16, 16)
        for name in ("conv_kxk", "conv_1x1", "patch_size", "transformer", "norm", "conv_proj", *names):
            assert hasattr(block, name), f"{why} (no attribute {name})"
        assert isinstance(block.patch_size, tuple), why
    assert not MobileVitV2Block(16, 16).coreml_exportable, why
    assert len(_patch_blocks(StudentDepthModel(decoder_width=16, head_width=8))) == 3, why


# --- transformers --------------------------------------------------------------------------------

def test_depth_anything_has_the_parts_the_teacher_calls():
    from transformers import DepthAnythingForDepthEstimation

    from modeling.teacher import PATCH_SIZE, tiny_config

    why = changed("transformers", "modeling/teacher.py (its forward and init_random)",
                  "DepthAnythingForDepthEstimation's parts")
    model = DepthAnythingForDepthEstimation(tiny_config())
    assert [name for name, _ in model.named_children()] == ["backbone", "neck", "head"], why
    assert list(inspect.signature(type(model.neck).forward).parameters)[:4] == [
        "self", "hidden_states", "patch_height", "patch_width"], why
    assert list(inspect.signature(type(model.head).forward).parameters)[:4] == [
        "self", "hidden_states", "patch_height", "patch_width"], why
    assert model.config.patch_size == PATCH_SIZE, why
    embeddings = [m for n, m in model.named_modules() if n.endswith("embeddings") and hasattr(m, "position_embeddings")]
    assert len(embeddings) == 1 and all(isinstance(getattr(embeddings[0], name), nn.Parameter)
                                        for name in ("position_embeddings", "cls_token", "mask_token")), why
    layers = model.config.backbone_config.num_hidden_layers
    assert sum(hasattr(m, "lambda1") for m in model.modules()) == 2 * layers, why
    assert isinstance(model.head.conv3, nn.Conv2d) and model.head.conv3.out_channels == 1, why
