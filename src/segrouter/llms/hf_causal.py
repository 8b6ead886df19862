"""A Hugging Face causal LM (Qwen2 or LLaMA family): random init from a config, or a local directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerBase, Qwen2Config

from segrouter.errors import ParamError, check_min
from segrouter.llms.base import CausalLLM
from segrouter.registry import register

_CONFIGS = {"qwen2": Qwen2Config, "llama": LlamaConfig}


@register("llm", "hf_causal")
class HFCausalLM(CausalLLM):
    """``path`` loads weights with ``from_pretrained`` from a local directory (safetensors, sharded or not;
    never downloads); otherwise a randomly initialised ``family`` model of the given shape is built.
    Embeddings are resized to the tokenizer, which carries the ``<image>`` and mask tokens."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        /,
        *,
        path: str | None = None,
        family: Literal["qwen2", "llama"] = "qwen2",
        hidden_size: int = 128,
        num_layers: int = 4,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        intermediate_size: int | None = None,
        rope_theta: float = 10000.0,
        initializer_range: float = 0.02,
        attn_implementation: Literal["sdpa", "eager"] = "sdpa",
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.check_params(path=path, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                          num_kv_heads=num_kv_heads, intermediate_size=intermediate_size, rope_theta=rope_theta,
                          initializer_range=initializer_range)
        if path:
            if not Path(path).is_dir():  # at build, not validation: recipes may be written where the files are not
                raise ParamError(f"LLM directory not found: {path}", param="path",
                                 fix="download it first; nothing is fetched at run time")
            model = AutoModelForCausalLM.from_pretrained(
                path, local_files_only=True, attn_implementation=attn_implementation, torch_dtype=torch.float32
            )
        else:
            config = _CONFIGS[family](
                vocab_size=len(tokenizer),
                hidden_size=hidden_size,
                num_hidden_layers=num_layers,
                num_attention_heads=num_heads,
                num_key_value_heads=num_kv_heads or num_heads,
                intermediate_size=intermediate_size or 4 * hidden_size,
                max_position_embeddings=4096,
                rope_theta=rope_theta,
                initializer_range=initializer_range,
                tie_word_embeddings=False,
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            config._attn_implementation = attn_implementation
            model = AutoModelForCausalLM.from_config(config)
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
        core = model.model
        missing = [a for a in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
                   if not hasattr(core.layers[0], a)]
        if missing:
            raise ParamError(
                f"{type(model).__name__} decoder layers lack {missing}",
                fix="use a LLaMA/Qwen2/Mistral-family model",
            )
        self.model = model
        self.hidden_size = int(model.config.hidden_size)
        self.num_layers = int(model.config.num_hidden_layers)
        self.layers = core.layers
        self.norm = core.norm
        self.lm_head = model.lm_head
        self.gradient_checkpointing = gradient_checkpointing

    @staticmethod
    def check_params(**p: Any) -> None:
        """The shape of a randomly initialised LLM, checked when a recipe is validated (and in __init__)."""
        path, hidden_size, num_heads = p["path"], p["hidden_size"], p["num_heads"]
        if not path:
            check_min(hidden_size=hidden_size, num_layers=p["num_layers"], num_heads=num_heads,
                      num_kv_heads=p["num_kv_heads"], intermediate_size=p["intermediate_size"])
            if not p["rope_theta"] > 0 or not p["initializer_range"] >= 0:
                key = "rope_theta" if not p["rope_theta"] > 0 else "initializer_range"
                raise ParamError(f"{p[key]} is out of range", param=key,
                                 fix="allowed: a number > 0" if key == "rope_theta" else "allowed: a number >= 0")
            if p["num_kv_heads"] is not None and num_heads % p["num_kv_heads"]:
                raise ParamError(f"num_heads {num_heads} is not divisible by num_kv_heads {p['num_kv_heads']}",
                                 param="num_kv_heads", fix="pick num_kv_heads dividing num_heads")
            if hidden_size % num_heads:
                raise ParamError(
                    f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}",
                    fix="pick num_heads dividing hidden_size",
                )
            if (hidden_size // num_heads) % 2:
                raise ParamError(
                    f"head size {hidden_size // num_heads} (hidden_size {hidden_size} / num_heads {num_heads}) is odd",
                    fix="rotary position embeddings need an even head size",
                )

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids)

    def rotary(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.model.rotary_emb(hidden, positions)

    def hf_hidden_states(self, embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The stock HF forward (final-norm output); the reference the ``full`` routing must reproduce."""
        return self.model.model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state

