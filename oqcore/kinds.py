"""The layer kinds a scheme can serve (a leaf module: configs, the registry and the planner share it).

- ``"linear"``: dense ``nn.Linear`` layers, ``y = x @ W.T (+ b)``;
- ``"moe"``: fused routed experts (``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]``, or the
  transposed GPT-OSS layout).
"""

KINDS: tuple[str, ...] = ("linear", "moe")
