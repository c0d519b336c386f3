"""The pytest plugin's parts; the entry point stays :mod:`pytest_modelhooks.plugin`.

- :mod:`.settings`: options, ini keys and the marker, parsed once (no torch).
- :mod:`.session`: what the plugin's hooks hand their work to (no torch).
- :mod:`.fixtures`: the torch side of the fixtures.
- :mod:`.guard`: the hook guard.
"""
