"""Built-in compression methods, one plugin module each (see METHODS.md)."""
