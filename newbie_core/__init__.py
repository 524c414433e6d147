"""newbie_core: a faithful, staged NewBie-image-Exp0.1 inference engine in pure PyTorch (no ComfyUI imports)."""
