"""Same-run comparisons of vgate's front door against direct vLLM (the figures issues ask for).

Run with `python -m benchmarks.run`; nothing in the product imports this package.
"""
