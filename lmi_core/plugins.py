"""The plugin manager: hookspecs, built-in plugins and entry-point plugins (group ``lmi``)."""

from __future__ import annotations

import functools
import importlib
import logging
import os

import pluggy

from lmi_core import hookspecs

logger = logging.getLogger(__name__)

# Built-in behaviour registered exactly like third-party plugins (datasette's pattern): the
# launchers of both modes (server side), the Engine-protocol worker hooks (worker side) and the
# backend of handle(inputs) models (DJL's Python engine).
DEFAULT_PLUGINS: tuple[str, ...] = (
    "lmi_core.launch.launchers",
    "lmi_core.worker.engine_hooks",
    "lmi_core.worker.handler",
)

ENTRY_POINT_GROUP = "lmi"


def new_plugin_manager(load_entry_points: bool = True) -> pluggy.PluginManager:
    """A fresh plugin manager with the built-in plugins and every installed ``lmi`` entry point.

    ``LMI_PLUGINS`` (comma list of entry-point names) restricts which installed plugins load;
    ``LMI_EXTRA_PLUGINS`` (comma list of importable modules) adds plugins that are not installed,
    in the server and in its workers alike (workers inherit the environment).
    """
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    for name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
    if load_entry_points:
        allowed = os.environ.get("LMI_PLUGINS")
        if allowed is None:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        else:
            for name in filter(None, (n.strip() for n in allowed.split(","))):
                pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=name)
    for module in filter(None, (m.strip() for m in os.environ.get("LMI_EXTRA_PLUGINS", "").split(","))):
        plugin = importlib.import_module(module)
        if not pm.is_registered(plugin):  # an installed plugin named again registers once
            pm.register(plugin, name=module)
    if os.environ.get("LMI_TRACE_HOOKS"):
        pm.add_hookcall_monitoring(
            lambda hook, impls, kwargs: logger.debug("hook %s -> %s", hook, [i.plugin_name for i in impls]),
            lambda outcome, hook, impls, kwargs: None,
        )
    return pm


@functools.cache
def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager."""
    return new_plugin_manager()
