"""The build domain: turn a lock into a verified, promoted env under the home.

Owns the home layout, the plan (reuse / build / rebuild / repair), key locks,
artifact verification, backends (rattler, micromamba, mamba, conda), env checks,
fingerprints, promotion, the CUDA host check, ``verify`` and ``gc``. Imports the
lock domain and the shared core, never models, sample or cli.
"""
