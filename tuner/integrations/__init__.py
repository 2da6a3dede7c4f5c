"""What runs inside the inference process on the sidecar's behalf: memory cleanup, precision changes, and
glue for hand-written torch decode loops (:mod:`.torch_loop`) and transformers' ``generate`` (:mod:`.hf`).

Nothing here imports torch at module import time except the modules that need it.
"""
