"""apexmtp gallery: APEX model entries (LocalAI schema), hardware detection, tier selection and verified downloads.

Public API (import from the modules; names like `pull` are also module names, so nothing is re-exported here):

* `gallery.pull.pull(ref, *, tier, models_dir, context, profile, progress) -> gallery.pull.PulledModel`
* `gallery.detect.detect(...) -> gallery.detect.HardwareProfile`
* `gallery.select.select(profile, candidates, policy, request) -> gallery.select.Selection`
* `gallery.catalog.load_catalog() -> gallery.catalog.Catalog`
"""
