"""`make soak`: long runs, outside `make test`."""
