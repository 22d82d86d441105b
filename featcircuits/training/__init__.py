"""Training sparse dictionaries offline: the docstring corpus and the multi-site SAE trainer."""
