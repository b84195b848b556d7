"""The daemon: start-up, signals, systemd, logging, and the doctor."""
