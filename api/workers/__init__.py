"""Running jobs: the runner of one job, background work, worker processes and their pool."""
