"""ComfyUI boundary client (implementation package). Import from `workers.comfy_client`."""
