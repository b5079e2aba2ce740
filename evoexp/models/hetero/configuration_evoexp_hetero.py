"""Config of an evoexp structurally pruned decoder: a Llama-family model whose layers differ in shape.

Shipped inside every checkpoint `evoexp.models.shrink.save_shrunk` writes (with `auto_map` in config.json), so
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` loads it with transformers alone. Per layer:
- `layer_kv_group_sizes[i]`: for each KV head the layer keeps, how many query heads read it. Query heads are
  stored grouped by KV head, so `[2, 3]` means q heads 0-1 read KV head 0 and q heads 2-4 read KV head 1
  (uneven GQA). `[]`: the layer has no attention sub-block (nor its input norm).
- `layer_intermediate_sizes[i]`: the MLP width; 0: no MLP sub-block (nor its norm).
Everything else (hidden size, head_dim, RoPE, norms' eps, activation, layer_types / sliding_window) is the
source model's, whose architecture is `source_model_type` and whose block each layer was is `source_layers`.
"""
from transformers import LlamaConfig

FORMAT_VERSION = 1


class EvoexpHeteroConfig(LlamaConfig):
    model_type = "evoexp_hetero"

    def kv_group_sizes(self, i: int) -> list[int]:
        sizes = getattr(self, "layer_kv_group_sizes", None)
        if sizes is None:  # a homogeneous layout, e.g. a config made by hand
            return [self.num_attention_heads // self.num_key_value_heads] * self.num_key_value_heads
        return list(sizes[i])

    def intermediate(self, i: int) -> int:
        sizes = getattr(self, "layer_intermediate_sizes", None)
        return self.intermediate_size if sizes is None else int(sizes[i])

    def flag(self, name: str) -> bool:
        """Biases and q/k norms: `attention_in_bias` (q/k/v), `attention_out_bias` (o), `mlp_in_bias` (gate/up),
        `mlp_out_bias` (down), `qk_norm` (Qwen3's per-head RMSNorm of q and k)."""
        defaults = {"attention_in_bias": self.attention_bias, "attention_out_bias": self.attention_bias,
                    "mlp_in_bias": self.mlp_bias, "mlp_out_bias": self.mlp_bias, "qk_norm": False}
        return bool(getattr(self, name, defaults[name]))


__all__ = ["EvoexpHeteroConfig"]
