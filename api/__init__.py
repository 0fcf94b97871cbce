"""The HTTP service around the core: FastAPI routes, the job store, the queue, files, workers.

Nothing here does tensor math; every job runs `compressor.compress` in a worker. The folders
say what is where: `http/` (routes, dependencies, schemas, errors, uploads), `jobs/` (the job
database, files, queue and the job service), `workers/` (running jobs, worker processes);
`main.py` builds the app, `commands.py` holds `compressor serve` and `compressor worker`.
"""
