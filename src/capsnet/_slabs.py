"""How large the temporaries of the fast paths are: every slab and chunk size in one place, with why.

Speed and memory knobs only: no result depends on them (each path's tests run it at tiny sizes
too, by setting these attributes). The paths read them at every call, so a change here, or a
``monkeypatch`` of this module, takes effect at once.
"""

#: ``capsnet.ops.conv``: images per chunk of the PrimaryCaps weight and input gradients, so that
#: oneDNN's transposed copy of the input stays near 2^22 elements (16 MiB in float32); whole, it
#: would be as large as the input again.
CONV_SLAB = 1 << 22

#: ``capsnet.ops.dft``: elements of the largest per-slab kernel transform (``M x channels x O``):
#: 2^22 = 16 MiB in float32, ten slabs of 26 channels for PrimaryCaps.
DFT_SLAB = 1 << 22

#: ``capsnet.routing.dense``: elements of one ``(B, J, slab of I, D)`` slab of votes moved between
#: layouts at a time (8 MiB in float32; twelve slabs for the MNIST model at batch 128). With freed
#: memory kept (capsnet.allocator) 8 MiB slabs are as fast as larger ones and lower the training
#: peak (docs/performance.md, "Where capsnet_mnist's training peak comes from"); one slab makes
#: full-size temporaries. Off the CPU the votes move in one slab.
DENSE_SLAB = 1 << 21

#: ``capsnet.routing._em_votes``: elements of one chunk of EM votes in the chunked reads (about
#: 1 MB of float32): large enough to amortise Python overhead, small enough that the chunk's
#: temporaries stay in cache.
EM_CHUNK = 1 << 18

#: The same off the CPU (about 256 MB): there the cost is one kernel launch per operation and
#: chunk, not cache misses, so every layer of the registered models is read in one chunk.
EM_CHUNK_GPU = 1 << 26
