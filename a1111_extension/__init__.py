"""Automatic1111 / Forge glue: the settings section, the always-visible script's hooks, the panel under
the gallery. What a check does and how results read is core/; this package only connects it to the webui
(modules.scripts, modules.shared, modules.script_callbacks), which it imports when the webui loads it."""
