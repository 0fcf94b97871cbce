"""The HTTP service around the core: FastAPI routes, the job store, the queue, files, workers.

Nothing here does tensor math; every job runs `compressor.compress` in a worker.
"""
