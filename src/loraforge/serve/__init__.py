"""`loraforge serve`: an OpenAI-compatible server over one base model and many LoRA adapters.

registry.py holds the model and its adapters (load/unload at run time), batching.py the worker that
batches requests for different adapters together, parsing.py checks requests, errors.py holds the error
types, app.py the HTTP layer (Starlette, the optional `serve` extra, imported only by server.build_app) and
server.py loads the model and runs uvicorn.
"""
