"""Cheap updates between releases: LoRA adapters, ConPET (static replay / dynamic experts + selector), LP-FT.

See docs/adapters.md; ``lrpath adapt PLAN.yaml --version V --method M`` drives :mod:`.runner`.
"""

# The update methods of `lrpath adapt` (kept here, import-light, for the CLI).
METHODS = ("full", "lora", "conpet-static", "conpet-dynamic", "lpft")
