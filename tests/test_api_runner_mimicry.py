"""Python API fixes in runner.protect_files and mimicry's settings and run messages."""

from __future__ import annotations

import warnings

import pytest
import torch
from PIL import Image

from mimicshield import Protector
from mimicshield.mimicry import Mimicry, MimicrySettings, Variant
from mimicshield.runner import protect_files


def _png(path, size=32):
    Image.new("RGB", (size, size), (120, 80, 40)).save(path)
    return path


def test_protect_files_takes_one_path_as_one_input(tiny_model, tmp_path):
    image = _png(tmp_path / "one.png")
    protector = Protector(tiny_model, steps=1)
    report = protect_files(str(image), tmp_path / "out", protector)
    assert [r.status for r in report.results] == ["protected"]


@pytest.mark.parametrize("size", [0, -1, 1.5, "2"])
def test_protect_files_refuses_bad_batch_size_before_writing(tiny_model, tmp_path, size):
    image = _png(tmp_path / "one.png")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="batch_size must be"):
        protect_files([image], out, Protector(tiny_model, steps=1), batch_size=size)
    assert not out.exists()


def test_settings_expand_aliases_and_refuse_unknown_names():
    assert MimicrySettings(scenarios=["sdedit"]).scenarios == ["sdedit-onestep", "sdedit-ddim"]
    assert MimicrySettings(scenarios="sdedit-ddim").scenarios == ["sdedit-ddim"]
    assert MimicrySettings(scenarios="ti,lora").scenarios == ["textual-inversion", "lora"]
    with pytest.raises(ValueError, match="Unknown scenario 'nope'; choose from: sdedit-onestep"):
        MimicrySettings(scenarios=["nope"])


def test_collapsing_sdedit_strengths_warn_once_in_one_line():
    with pytest.warns(UserWarning, match=r"0\.1, 0\.3 all run 1 of 4.*--sdedit-steps"):
        MimicrySettings(scenarios=["sdedit-ddim"], sdedit_strengths=(0.1, 0.3), sdedit_steps=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MimicrySettings(scenarios=["sdedit-ddim"], sdedit_strengths=(0.1, 0.3), sdedit_steps=10)
        MimicrySettings(scenarios=["sdedit-onestep"], sdedit_strengths=(0.1, 0.3), sdedit_steps=4)


def test_run_says_what_is_wrong(tiny_model_with_decoder):
    settings = MimicrySettings(resolution=32, sdedit_strengths=(0.5,), sdedit_steps=2)
    mimicry = Mimicry(tiny_model_with_decoder, settings)
    image = torch.rand(3, 32, 32)
    with pytest.raises(ValueError, match="Unknown scenario 'nope'"):
        mimicry.run(Variant("nope"), image)
    with pytest.raises(ValueError, match="Unknown scenario 'sdedit'"):
        mimicry.run(Variant("sdedit", 0.1), image)
    with pytest.raises(ValueError, match="learns from a set"):
        mimicry.run(Variant("lora"), image)
    with pytest.raises(ValueError, match=r"one \(3, H, W\) image.*\(2, 3, 32, 32\)"):
        mimicry.run(Variant("sdedit-ddim", 0.5), torch.rand(2, 3, 32, 32))
