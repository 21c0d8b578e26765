"""Neighbour search over the support set: FAISS flat / IVF / HNSW indexes, GPU placement and
sharding (:mod:`.index`, the one place with device logic) and the exact-search building blocks
they share (:mod:`.exhaustive`)."""
