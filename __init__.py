"""NewBie-image staged nodes for ComfyUI (V3). Importable outside ComfyUI (then it registers nothing).

Only `comfy_entrypoint` is exported: defining NODE_CLASS_MAPPINGS too would make ComfyUI skip the V3 nodes.
"""
WEB_DIRECTORY = "./web"

try:
    import comfy_api.latest  # noqa: F401  (present only inside ComfyUI)
except ImportError:  # plain Python: tests and tools import newbie_core directly
    comfy_entrypoint = None
else:
    async def comfy_entrypoint():
        """ComfyUI's V3 entry point: the pack's extension."""
        from .nodes import NewBieExtension

        return NewBieExtension()
