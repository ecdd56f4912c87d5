"""The ground floor: what every other part stands on and which imports nothing of ours outside this package.

The error hierarchy (`errors`), every environment knob (`constants`), file checks (`files`), GGUF header reading
(`gguf_file`) and byte/context units (`units`). `lint-imports` (contracts in pyproject.toml) keeps it that way.
"""
