TITLE = "StoryDiffusion"
DESCRIPTION = ("Consistent characters across scenes with the ComfyUI_StoryDiffusion plugin (story mode, SDXL): "
               "one image per scene.")
