"""The worker on this host: its row (registration), the daemon's loop (service), its signals,
systemd notifications, runtime detection and the assignments file."""
