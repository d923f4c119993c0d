"""Running the service: the daemon loop, training jobs and their worker, recovery, promotion, operator
requests, retention, notifications and systemd."""
