"""Starting workers: launchers of both modes, processes, devices; multi-host hosts, placement, preflight."""
