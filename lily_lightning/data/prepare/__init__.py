"""`prepare vtab1k` and `prepare fgvc`: build the benchmark trees that `data check` and the DataModules read."""
