"""Every sampler name renders with its diffusers scheduler; kohya's names are aliases; bad names are refused."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lorabake import samplers
from lorabake.models import bases
from lorabake.project_file import Samples
from lorabake.render.cells import load_pipeline


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "tiny"
    bases.build_base("tiny-sd", out)
    return out


@pytest.mark.parametrize("name", list(samplers.SAMPLERS))
def test_every_sampler_renders_with_its_scheduler(tiny, name):
    pipe = load_pipeline(tiny, name)
    class_name, settings = samplers.SAMPLERS[name]
    assert type(pipe.scheduler).__name__ == class_name
    assert all(pipe.scheduler.config[key] == value for key, value in settings.items())
    image = pipe("a red circle", num_inference_steps=4, width=64, height=64,
                 generator=torch.Generator().manual_seed(0)).images[0]
    pixels = np.asarray(image)
    assert image.size == (64, 64) and pixels.std() > 0


def test_kohya_names_are_aliases_and_unknown_names_are_refused():
    assert Samples(prompts=["a"], sampler="k_euler_a").sampler == "euler_a"
    assert Samples(prompts=["a"], sampler="dpmsolver++").sampler == "dpmpp_2m"
    assert Samples(prompts=["a"], sampler="DPMPP_2M_Karras").sampler == "dpmpp_2m_karras"
    with pytest.raises(ValueError, match="unknown sampler 'dpm_fast'.*dpmpp_2m_karras"):
        Samples(prompts=["a"], sampler="dpm_fast")
