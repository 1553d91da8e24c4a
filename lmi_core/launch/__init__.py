"""Starting workers: launchers of both modes, processes, devices, multi-host placement and preflight."""
