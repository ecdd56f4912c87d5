"""APEX quantizer: tier recipes as data (recipes.yaml), per-tensor plans (plan.py), importance matrices collected
with llama.cpp including the MTP head (imatrix.py), verified tier builds (quantize.py), evaluation (evaluate.py),
publishing (publish.py) and LocalAI quantization jobs (jobs.py). CLI verbs live in cli.py."""
