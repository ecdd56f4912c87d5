"""The ground floor: what every other part stands on; it imports nothing of ours outside this package.

The error hierarchy (`errors`), every environment knob (`constants`), file checks (`files`), GGUF header reading
(`gguf_file`), byte/context units (`units`), RPC worker addresses (`endpoints`), the MTP acceptance maths
(`acceptance`) and the one ctypes binding of the ggml llama.cpp loaded (`ggml`). `lint-imports` (contracts in
pyproject.toml) keeps it that way.
"""
