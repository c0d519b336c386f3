"""Health: the bounds a check takes (:mod:`.bounds`, defined once for the library, the marker,
the ini file and the CLI; no torch import) and the rules over recorded statistics
(:mod:`.rules`). Nothing is imported here, so that the plugin reads the bounds without torch."""
