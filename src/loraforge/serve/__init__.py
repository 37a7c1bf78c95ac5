"""`loraforge serve`: an OpenAI-compatible server over one base model and many LoRA adapters.

registry.py holds the model and its adapters (load/unload at run time), batching.py the worker that
batches requests for different adapters together, server.py the HTTP layer (Starlette + uvicorn, the
optional `serve` extra, imported lazily).
"""
