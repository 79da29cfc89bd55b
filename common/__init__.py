"""stepcache's shared library: config, logging, errors, names, processing graph, cache, queue."""
