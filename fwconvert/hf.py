"""transformers integration: ``AutoConfig`` / ``AutoModelForCausalLM`` load a converted folder.

``register()`` (called by ``fwconvert/__init__`` when transformers is imported) maps model_type
"fwconvert" to ``FwconvertConfig`` and ``FwconvertForCausalLM``, a thin ``PreTrainedModel`` around our
``DecoderLM`` whose state_dict keys equal the checkpoint keys (``model.*``, ``lm_head.*``, ``fwl_head.*``).
Stock transformers without ``import fwconvert`` refuses the model type instead of silently dropping fast weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .families import FWCONVERT_MODEL_TYPE

_registered = False


class FwconvertConfig(PretrainedConfig):
    """The converted folder's config.json: the base HF config + base_model_type + fast_weights."""

    model_type = FWCONVERT_MODEL_TYPE

    def __init__(self, base_model_type=None, fast_weights=None, **kwargs):
        self.base_model_type = base_model_type
        self.fast_weights = fast_weights
        super().__init__(**kwargs)

    def raw_dict(self) -> dict:
        """The config as our parser sees it (transformers' own bookkeeping keys are ignored there)."""
        d = self.to_dict()
        d["model_type"] = FWCONVERT_MODEL_TYPE
        return d


def _build_decoder(config: FwconvertConfig):
    from .config import fast_weights_from_dict
    from .families import parse_config
    from .modeling import build_model

    raw = config.raw_dict()
    cfg = parse_config(raw, "config.json")
    fw = fast_weights_from_dict(raw.get("fast_weights"), "config.json")
    return build_model(cfg, fw, device=torch.get_default_device())


class FwconvertForCausalLM(PreTrainedModel):
    """A converted fwconvert model (FWL head or in-place TTT) behind the transformers API.

    ``forward(input_ids, labels=None)`` runs the whole sequence from a fresh fast-weight state and returns
    logits (and the mean next-token loss when ``labels`` are given; -100 is ignored, labels are shifted
    inside, as in transformers). Streaming with explicit state: use ``self.decoder.step``."""

    config_class = FwconvertConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    _no_split_modules = ["DecoderLayer"]

    def __init__(self, config: FwconvertConfig):
        super().__init__(config)
        dec = _build_decoder(config)
        self.__dict__["decoder"] = dec  # not a submodule: its children are registered below, keys unprefixed
        self.model = dec.model
        if dec.lm_head is not None:
            self.lm_head = dec.lm_head
        if dec.fwl_head is not None:
            self.fwl_head = dec.fwl_head
        self.post_init()

    def _init_weights(self, module):  # every weight comes from the checkpoint; new ones were set at conversion
        return

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.decoder.lm_head

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor = None, attention_mask=None, **kwargs):
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("fwconvert models process whole unpadded sequences; padding masks are not supported")
        dec = self.decoder
        if dec.inv_freq.device != input_ids.device or dec.inv_freq.is_meta:
            dec.reset_buffers()
        logits = dec(input_ids)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)


def register() -> None:
    """Make transformers' Auto classes load model_type "fwconvert" (idempotent)."""
    global _registered
    if _registered:
        return
    AutoConfig.register(FWCONVERT_MODEL_TYPE, FwconvertConfig, exist_ok=True)
    AutoModelForCausalLM.register(FwconvertConfig, FwconvertForCausalLM, exist_ok=True)
    _registered = True
