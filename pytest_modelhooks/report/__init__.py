"""Reports: the text of records (:mod:`.text`), what changed between two texts (:mod:`.diff`),
and plots (:mod:`.plots`). Imported by the snapshot extension, the CLI and the plugin; imports
nothing above the records."""
