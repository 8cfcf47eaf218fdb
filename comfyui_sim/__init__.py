"""comfyui_sim: a protocol-faithful SIMULATOR of a ComfyUI 0.8 server.

It speaks ComfyUI's HTTP and websocket protocol as recorded from a real server
(tests/transcripts/), runs prompts one at a time with realistic timing, and writes
real (labelled, not diffused) PNG files.  Start it with `python -m comfyui_sim`.
"""
