"""pytest-benchmark suite: in-process, socketpair and shm side by side."""
