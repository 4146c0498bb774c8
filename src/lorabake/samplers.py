"""Sampler names as A1111 and ComfyUI users know them, each a diffusers scheduler with its settings.

Torch-free (the config check reads it): `SAMPLERS[name] = (diffusers class, config overrides)`;
kohya's `sample_sampler` names (`k_euler_a`, `dpmsolver++`, …) are accepted as `ALIASES` and stored
under the name users know. "_karras" means Karras et al.'s sigma spacing (`use_karras_sigmas`).
"""
from __future__ import annotations

SAMPLERS: dict[str, tuple[str, dict]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "lms_karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                         "use_karras_sigmas": True}),
    "dpmpp_2m_sde_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2,
                                                             "use_karras_sigmas": True}),
    "dpmpp_sde_karras": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
    "dpm_multistep": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpm_singlestep": ("DPMSolverSinglestepScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
# kohya sd-scripts' sample_sampler choices → the names above
ALIASES = {"k_euler": "euler", "k_euler_a": "euler_a", "k_lms": "lms", "k_dpm_2": "dpm_2", "k_dpm_2_a": "dpm_2_a",
           "dpmsolver++": "dpmpp_2m", "dpmsolver": "dpm_multistep", "dpmsingle": "dpm_singlestep"}


def canonical(name: str) -> str:
    """The sampler's name as users know it; ValueError listing every name for an unknown one."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; give one of {', '.join(SAMPLERS)} "
                         f"(or kohya's {', '.join(ALIASES)})")
    return key
