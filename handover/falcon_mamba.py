"""TII's Falcon-Mamba (HF ``FalconMambaForCausalLM``, ``model_type: falcon_mamba``) in and out.

Falcon-Mamba (Zuo et al. 2024, arXiv:2410.05355) is Mamba-1 with dt, B and C RMS-normalised,
without weights, right after ``x_proj`` (here ``model.ssm.b_c_dt_rms``). Read from transformers
4.53: ``FalconMambaConfig`` is ``MambaConfig`` plus ``mixer_rms_eps`` (the norms' epsilon), and
``FalconMambaForCausalLM``'s parameter names are ``MambaForCausalLM``'s, since the norms have no
weights. So the HF Mamba-1 reader and writer (``handover/hf_mamba.py``) do the rest; this file
holds what Falcon-Mamba adds to them, both ways.
"""

from __future__ import annotations

from typing import Any

from models.config import MambaConfig

MODEL_TYPE = "falcon_mamba"


def falcon_mamba_config_fields(cfg: MambaConfig) -> dict[str, Any]:
    """What ``FalconMambaConfig`` changes in, or adds to, the HF Mamba-1 ``config.json`` of ``cfg``."""
    assert cfg.ssm.b_c_dt_rms, "only a model with Falcon-Mamba's dt/B/C norms is a Falcon-Mamba"
    return {
        "model_type": MODEL_TYPE,
        "architectures": ["FalconMambaForCausalLM"],
        "mixer_rms_eps": cfg.ssm.b_c_dt_rms_eps,
    }


def falcon_mamba_ssm_fields(hf: Any) -> dict[str, Any]:
    """Our ``model.ssm`` settings for the norms of a transformers ``FalconMambaConfig`` ``hf``."""
    return {"b_c_dt_rms": True, "b_c_dt_rms_eps": hf.mixer_rms_eps}
