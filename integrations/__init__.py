"""Integrations with libraries that generate images outside the hosts (diffusers). Each module imports its
library only when used; named so that none shadows the library itself (integrations/diffusers.py is
``provenance_guard.integrations.diffusers``)."""
