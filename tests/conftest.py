"""Shared test setup: hypothesis profiles and the default backend.

Profiles: ``ci`` (the default: enough examples to matter, no deadline
because shared 2-core machines are noisy) and ``dev`` (fast, for iterating).
Choose with ``HYPOTHESIS_PROFILE=dev pytest``.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=20, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
