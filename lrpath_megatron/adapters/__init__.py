"""Cheap updates between releases: LoRA adapters, ConPET (static replay / dynamic experts + selector), LP-FT.

See docs/adapters.md; ``lrpath adapt PLAN.yaml --version V --method M`` trains what :mod:`.update`
describes through :mod:`lrpath_megatron.adapt`.
"""

# The update methods of `lrpath adapt` (kept here, import-light, for the CLI).
METHODS = ("full", "lora", "conpet-static", "conpet-dynamic", "lpft")
