"""The pytest plugin (entry point ``modelhooks``).

This module must stay cheap to import: pytest loads it for every run, including runs that never
touch a model, so torch is imported inside fixtures only.
"""

from __future__ import annotations
