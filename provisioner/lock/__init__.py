"""The lock domain: specs in, conda-lock files out, and reading any lock back.

Owns ``environment-specs/<key>.yml`` parsing, channels and mirrors, virtual
packages per platform, the rattler solve, the uv-locked pip layer, writing and
checking lockfiles, and summaries and diffs of locks. Imports only the shared
core (config, errors, keys, fsops, paths, processes).
"""
