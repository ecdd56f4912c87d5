"""apexmtp gallery: APEX model entries (LocalAI schema), hardware detection, tier selection and verified downloads.

Public API (import from the modules; names like `pull` are also module names, so nothing is re-exported here):

* `gallery.pull.pull(ref, *, tier, models_dir, context, profile, progress, mtp, parallel, prefer)
  -> gallery.pull.PulledModel`
* `gallery.detect.detect(...) -> gallery.detect.HardwareProfile` (hardware, the llama.cpp build, RAM bandwidth)
* `gallery.select.select(profile, candidates, policy, request) -> gallery.select.Selection` (with `predicted_tok_s`)
* `gallery.speed.predict(...) -> gallery.speed.Speed` (decode tokens/s model)
* `gallery.catalog.load_catalog() -> gallery.catalog.Catalog` (its `policy`: a `gallery.policy.Policy`)
"""
