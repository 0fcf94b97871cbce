"""What the tests share, imported as `tests.support.<module>`.

- `tiny_models`, `tiny_checkpoints`, `corpus_programs`: small programs and checkpoints to
  compress; `students`: one's student as the pipeline initializes it;
- `fakes`: fast stand-ins for `compressor.compress`;
- `backends`: the embedded and distributed job store / queue every backend test runs against;
- `service`: fast settings, an app served in a thread, waiting for a job;
- `processes`: `compressor serve` / `compressor worker` as real subprocesses;
- `command_service`: a command line (the image's, the README's) run until `/healthz` answers;
- `network`: `free_port`.
"""
