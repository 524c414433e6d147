"""ComfyUI glue for NewBie-image (V3 schema). Thin: every behaviour lives in newbie_core; ComfyUI internals in _comfy."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .loaders import NewBieDiTLoader, NewBieTextEncoderLoader, NewBieVAELoader
from .lora import NewBieLoraLoader, NewBieLoraLoaderMulti
from .memory_purge import NewBieMemoryPurge
from .prompt_enhance import NewBiePromptEnhance
from .sampler import NewBieDiTSampler
from .text_encode import NewBieTextEncode
from .vae_decode import NewBieVAEDecode
from .vae_encode import NewBieVAEEncode
from .xml_prompt import NewBieXMLAssemble, NewBieXMLCharacter, NewBieXMLGeneralTags

NODES: list[type[io.ComfyNode]] = [
    NewBieDiTLoader, NewBieTextEncoderLoader, NewBieVAELoader, NewBieTextEncode, NewBieDiTSampler,
    NewBieVAEDecode, NewBieVAEEncode, NewBieMemoryPurge, NewBieXMLCharacter, NewBieXMLGeneralTags, NewBieXMLAssemble,
    NewBiePromptEnhance, NewBieLoraLoader, NewBieLoraLoaderMulti,
]


class NewBieExtension(ComfyExtension):
    """The pack's node list for ComfyUI."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        """Every node of the pack."""
        return list(NODES)


def node_ids() -> list[str]:
    """The node ids this pack registers."""
    return [n.GET_SCHEMA().node_id for n in NODES]
