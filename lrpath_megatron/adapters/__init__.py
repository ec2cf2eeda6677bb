"""Cheap updates between releases: LoRA adapters, ConPET (static replay / dynamic experts + selector), LP-FT.

See docs/adapters.md; ``lrpath adapt PLAN.yaml --version V --method M`` drives :mod:`.runner`.
"""
