TITLE = "SDXL text to image"
DESCRIPTION = "A plain SDXL text-to-image graph with ComfyUI's core nodes: one image per job."
