"""The worker pool: leasing, supervision, and its decisions as pure functions."""
