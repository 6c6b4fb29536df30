"""The sample domain: real conda packages written offline, the sample project and the demo.

Owns the conda package writer, the sample GPU stack and channel, sample legacy
venvs, the sample project and ``provisioner demo``. The top of the library: it may
import every other domain; nothing but the CLI and tests import it.
"""
