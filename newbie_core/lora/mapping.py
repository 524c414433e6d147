"""Which DiT weight each LoRA module adapts: names resolved against the model's own key list, never guessed.

`TargetIndex` is built from the DiT's state-dict key names and shapes (official layout) and its config. It
knows, for every Linear weight `X.weight`:
- the official module name `X` and its underscored form (`layers_0_attention_qkv`), which kohya / LyCORIS
  files use — the underscored table is built from the real names, and an underscored name two modules share
  is refused rather than guessed;
- the diffusers (Lumina2Transformer2DModel) name `newbie_core.checkpoints` converts to, dotted and underscored;
  the split `attn.to_q` / `to_k` / `to_v` map to row ranges of the fused GQA `attention.qkv`
  (q = n_heads·head_dim rows, then k and v = n_kv_heads·head_dim rows each, from the loaded config).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping

from .. import checkpoints

Rows = tuple[int, int] | None  # (first row, row count) inside the target weight, None = the whole weight
_BLOCK_RE = re.compile(r"^(layers|noise_refiner|context_refiner)\.(\d+)\.(.*)$")


@dataclass(frozen=True)
class Target:
    """A resolved LoRA target: the official weight key, the rows it covers (None = all) and its shape."""

    key: str
    rows: Rows
    shape: tuple[int, ...]


def _diffusers_name(module: str) -> str | None:
    """The diffusers module name of an official Linear module name (None when it has none)."""
    m = _BLOCK_RE.match(module)
    if m:
        group, i, rest = m.groups()
        new = checkpoints._swap(rest + ".", checkpoints._BLOCK_MAP, 0)
        return f"{group}.{i}.{new[:-1]}" if new else None
    new = checkpoints._swap(module + ".", checkpoints._TOP_MAP, 0)
    return new[:-1] if new else None


class TargetIndex:
    """Name → `Target` tables of one DiT (see the module docstring)."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], n_heads: int, n_kv_heads: int, head_dim: int):
        self.shapes = {k: tuple(v) for k, v in shapes.items()}
        self.dotted: dict[str, Target] = {}
        underscored: dict[str, list[Target]] = {}
        q, kv = n_heads * head_dim, n_kv_heads * head_dim
        for key, shape in self.shapes.items():
            if not key.endswith(".weight") or len(shape) != 2:
                continue
            module = key[: -len(".weight")]
            names = {module: Target(key, None, shape)}
            if module.endswith(".attention.qkv"):
                pre = module[: -len("attention.qkv")] + "attn."
                for name, rows in (("to_q", (0, q)), ("to_k", (q, kv)), ("to_v", (q + kv, kv))):
                    names[pre + name] = Target(key, rows, (rows[1], shape[1]))
            else:
                diff = _diffusers_name(module)
                if diff:
                    names[diff] = Target(key, None, shape)
            for name, target in names.items():
                self.dotted[name] = target
                underscored.setdefault(name.replace(".", "_"), []).append(target)
        self.underscored = {n: ts[0] for n, ts in underscored.items() if len({(t.key, t.rows) for t in ts}) == 1}

    @classmethod
    def for_model(cls, model) -> "TargetIndex":
        """The index of a loaded `NextDiT` (any storage dtype; only names and shapes are read)."""
        cfg = model.config
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        return cls(shapes, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)

    @classmethod
    def for_state_dict(cls, sd: Mapping, config) -> "TargetIndex":
        """The index of an official-layout state dict with its `DiTConfig`."""
        return cls({k: tuple(v.shape) for k, v in sd.items()}, config.n_heads, config.n_kv_heads, config.head_dim)

    def resolve(self, name: str, dotted: bool = True) -> Target | None:
        """The target of a module name as a file spells it (prefix removed), or None."""
        if dotted and name in self.dotted:
            return self.dotted[name]
        return self.underscored.get(name) or (self.dotted.get(name) if not dotted else None)

    def aliases(self, prefixes: Iterable[tuple[str, bool]]) -> dict[str, Target]:
        """Every file-side module name this index accepts, with each (prefix, dotted?) prepended."""
        out: dict[str, Target] = {}
        for prefix, dotted in prefixes:
            table = self.dotted if dotted else self.underscored
            for name, target in table.items():
                out[prefix + name] = target
        return out
