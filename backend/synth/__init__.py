"""Synthetic test models (tiny qwen35moe GGUFs with an MTP head), kept out of the serving path."""
