"""Built-in evaluation tasks and their vendored data (see tasks/data/README.md)."""
