"""LocalAI's backend wire contract (`backend.proto`) and the Python stubs generated from it.

Regenerate with `python -m proto.generate` after editing the .proto; a test fails when they disagree.
"""
