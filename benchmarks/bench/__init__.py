"""The serving benchmark's parts: datasets, arrivals, client, metrics, load generator, servers, suites,
runner, plots and report. benchmarks/serve_bench.py is the command line."""
