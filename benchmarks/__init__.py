"""pdserve's benchmarks: scripts (run by path) and the load generator package `loadgen` (`pdserve bench`)."""
