"""Project tooling: the GPU check driver, the host-synchronisation audit, packaging."""
