"""mtkit: a command-line neural machine translation toolkit."""

import os

# oneDNN (which runs mtkit's float32 CPU matmuls, see mtkit.models.linear) keeps every matmul
# shape it has seen in two caches, PyTorch's (LRU_CACHE_CAPACITY) and its own
# (ONEDNN_PRIMITIVE_CACHE_CAPACITY), 1024 entries each and ~300 KiB per entry. Training batches
# come in hundreds of shapes, so both fill up during training, and their long-lived entries,
# allocated between the activations of a step, fragment the heap: about 1.2 GiB more resident
# memory on the reference setup (2.6 -> 1.4 GiB peak). 64 entries cover the shapes one training step or one decoding
# step reuses. Read when oneDNN makes its first matmul, so this acts only if mtkit is imported
# before then; a value set by the user is kept.
for _name in ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY"):
    os.environ.setdefault(_name, "64")

__version__ = "0.1.0"
