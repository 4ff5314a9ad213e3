"""What the tests share that is not a test: stand-in models and loaders, fault injection, training
entries run as subprocesses, shard builders, a SLURM cluster. Fixtures live in tests/conftest.py."""
